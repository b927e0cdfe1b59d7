"""data import: COCO / VOC / YOLO / LabelMe round trips into the normalised layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from defectkit.cli import main
from detect.data.check import check_target
from detect.data.foreign import FOREIGN_CLASSES, make_foreign_coco
from detect.data.importers import import_dataset, resolve_classes
from detect.data.synth import generate_line
from detect.linespec import LineSpec
from edge_runtime.errors import DataError, UserInputError

CLASSES = ["missing_hole", "mouse_bite", "open_circuit", "short", "spur", "spurious_copper"]


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("truth")
    generate_line(root, line="src", count=6, seed=11, image_format="png", defect_free_fraction=0.2, progress=False)
    return root, json.loads((root / "annotations" / "all.json").read_text())


def _boxes_by_file(coco: dict) -> dict[str, list[tuple[str, tuple[float, ...]]]]:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: Path(im["file_name"]).stem for im in coco["images"]}
    out: dict = {Path(im["file_name"]).stem: [] for im in coco["images"]}
    for a in coco["annotations"]:
        out[files[a["image_id"]]].append((names[a["category_id"]], tuple(round(v, 1) for v in a["bbox"])))
    return {k: sorted(v) for k, v in out.items()}


def _assert_round_trip(out: Path, truth_coco: dict, line: str) -> None:
    got = json.loads((out / "annotations" / "all.json").read_text())
    assert [c["name"] for c in got["categories"]] == CLASSES
    assert [c["id"] for c in got["categories"]] == list(range(1, 7))
    assert _boxes_by_file(got) == _boxes_by_file(truth_coco)
    spec = LineSpec.load(out / f"{line}.yaml")
    assert spec.classes == CLASSES and spec.paths.root == out.resolve()
    assert check_target(out / f"{line}.yaml").ok


def test_coco_foreign_ids_renumbered(tmp_path: Path) -> None:
    spec_path = make_foreign_coco(tmp_path / "foreign")
    src = json.loads((tmp_path / "foreign" / "annotations" / "all.json").read_text())
    assert min(c["id"] for c in src["categories"]) == 11
    out = tmp_path / "imported"
    assert main(["data", "import", "--format", "coco", str(tmp_path / "foreign" / "annotations" / "all.json"),
                 "--spec", str(spec_path), "--out", str(out), "--line", "surface"]) == 0
    got = json.loads((out / "annotations" / "all.json").read_text())
    assert got["categories"] == [{"id": i + 1, "name": n, "supercategory": "defect"} for i, n in enumerate(FOREIGN_CLASSES)]
    src_names = {c["id"]: c["name"] for c in src["categories"]}
    got_names = {c["id"]: c["name"] for c in got["categories"]}
    assert sorted(src_names[a["category_id"]] for a in src["annotations"]) == sorted(got_names[a["category_id"]] for a in got["annotations"])
    assert len(got["images"]) == len(src["images"]) and len(list((out / "images").iterdir())) == len(src["images"])
    assert {(im["width"], im["height"]) for im in got["images"]} == {(im["width"], im["height"]) for im in src["images"]}
    assert LineSpec.load(out / "surface.yaml").model_size == "tiny"  # settings carried over from --spec
    assert check_target(out / "surface.yaml").ok


def test_voc_round_trip(truth, tmp_path: Path) -> None:
    root, coco = truth
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for im in coco["images"]:
        shutil.copy(root / "images" / im["file_name"], voc / "JPEGImages" / im["file_name"])
        objs = "".join(
            f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{a['bbox'][0] + 1}</xmin><ymin>{a['bbox'][1] + 1}</ymin>"
            f"<xmax>{a['bbox'][0] + a['bbox'][2] - 1 + 1}</xmax><ymax>{a['bbox'][1] + a['bbox'][3] - 1 + 1}</ymax>"
            "</bndbox></object>"
            for a in coco["annotations"] if a["image_id"] == im["id"])
        xml = (f"<annotation><filename>{im['file_name']}</filename><size><width>{im['width']}</width>"
               f"<height>{im['height']}</height><depth>3</depth></size>{objs}</annotation>")
        (voc / "Annotations" / (Path(im["file_name"]).stem + ".xml")).write_text(xml)
    out = tmp_path / "out"
    assert main(["data", "import", "--format", "voc", str(voc), "--classes", ",".join(CLASSES), "--out", str(out),
                 "--line", "voc-line"]) == 0
    _assert_round_trip(out, coco, "voc-line")


def _write_yolo(root: Path, coco: dict, dst: Path, sub: str = "") -> None:
    (dst / "images" / sub).mkdir(parents=True, exist_ok=True)
    (dst / "labels" / sub).mkdir(parents=True, exist_ok=True)
    for im in coco["images"]:
        shutil.copy(root / "images" / im["file_name"], dst / "images" / sub / im["file_name"])
        rows = []
        for a in coco["annotations"]:
            if a["image_id"] == im["id"]:
                x, y, w, h = a["bbox"]
                rows.append(f"{a['category_id'] - 1} {(x + w / 2) / im['width']:.8f} {(y + h / 2) / im['height']:.8f} "
                            f"{w / im['width']:.8f} {h / im['height']:.8f}")
        if rows:  # defect-free images have no label file at all, as YOLO tools write them
            (dst / "labels" / sub / (Path(im["file_name"]).stem + ".txt")).write_text("\n".join(rows) + "\n")


def test_yolo_round_trip_with_classes_txt(truth, tmp_path: Path) -> None:
    root, coco = truth
    yolo = tmp_path / "yolo"
    _write_yolo(root, coco, yolo)
    (yolo / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    classes, base = resolve_classes(None, None, "yolo", yolo)
    assert classes == CLASSES and base is None
    spec = import_dataset("yolo", yolo, classes, tmp_path / "out", line="yolo-line")
    assert spec.line == "yolo-line"
    _assert_round_trip(tmp_path / "out", coco, "yolo-line")


def test_yolo_duplicate_names_stay_unique(truth, tmp_path: Path) -> None:
    root, coco = truth
    yolo = tmp_path / "yolo"
    _write_yolo(root, coco, yolo, "train")
    _write_yolo(root, coco, yolo, "val")
    import_dataset("yolo", yolo, CLASSES, tmp_path / "out")
    got = json.loads((tmp_path / "out" / "annotations" / "all.json").read_text())
    names = [im["file_name"] for im in got["images"]]
    assert len(names) == 2 * len(coco["images"]) == len(set(names))
    assert len(got["annotations"]) == 2 * len(coco["annotations"])
    assert check_target(tmp_path / "out").ok


def test_labelme_rectangles_and_polygons(truth, tmp_path: Path) -> None:
    root, coco = truth
    lm = tmp_path / "labelme"
    lm.mkdir()
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for im in coco["images"]:
        shutil.copy(root / "images" / im["file_name"], lm / im["file_name"])
        shapes = []
        for i, a in enumerate(a for a in coco["annotations"] if a["image_id"] == im["id"]):
            x, y, w, h = a["bbox"]
            if i % 2:  # polygon: a diamond plus corners gives the same bounding box
                pts = [[x, y + h / 2], [x + w / 2, y], [x + w, y + h / 2], [x + w / 2, y + h], [x + w, y + h]]
                shape_type = "polygon"
            else:
                pts, shape_type = [[x + w, y + h], [x, y]], "rectangle"
            shapes.append({"label": names[a["category_id"]], "points": pts, "shape_type": shape_type})
        doc = {"version": "5.2.1", "shapes": shapes, "imagePath": im["file_name"], "imageData": None,
               "imageHeight": im["height"], "imageWidth": im["width"]}
        (lm / (Path(im["file_name"]).stem + ".json")).write_text(json.dumps(doc))
    import_dataset("labelme", lm, CLASSES, tmp_path / "out", line="lm")
    _assert_round_trip(tmp_path / "out", coco, "lm")


def test_unknown_classes_listed_or_dropped(truth, tmp_path: Path, capsys) -> None:
    root, coco = truth
    src = root / "annotations" / "all.json"
    few = ",".join(CLASSES[:4])
    assert main(["data", "import", "--format", "coco", str(src), "--classes", few, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "'spur'" in err and "'spurious_copper'" in err and "--drop-unknown" in err
    assert not (tmp_path / "a" / "annotations" / "all.json").exists()
    assert main(["data", "import", "--format", "coco", str(src), "--classes", few, "--out", str(tmp_path / "b"),
                 "--drop-unknown"]) == 0
    got = json.loads((tmp_path / "b" / "annotations" / "all.json").read_text())
    kept = sum(1 for a in coco["annotations"] if a["category_id"] <= 4)
    assert len(got["annotations"]) == kept and len(got["images"]) == len(coco["images"])


def test_import_errors_name_the_fix(truth, tmp_path: Path) -> None:
    root, coco = truth
    with pytest.raises(UserInputError, match="--classes a,b,c"):
        resolve_classes(None, None, "voc", root)
    with pytest.raises(UserInputError, match="not both"):
        resolve_classes("a", root / "src.yaml", "coco", root)
    yolo = tmp_path / "yolo"
    _write_yolo(root, coco, yolo)
    label = next((yolo / "labels").glob("*.txt"))
    label.write_text("0 0.5 0.5\n")
    with pytest.raises(DataError, match=r"line 1: expected 'class cx cy w h'"):
        import_dataset("yolo", yolo, CLASSES, tmp_path / "out")
    broken = json.loads((root / "annotations" / "all.json").read_text())
    broken["images"][0]["file_name"] = "nowhere.png"
    (tmp_path / "c.json").write_text(json.dumps(broken))
    with pytest.raises(DataError, match="nowhere.png"):
        import_dataset("coco", tmp_path / "c.json", CLASSES, tmp_path / "out2", images_dir=root / "images")


def _write_voc(root: Path, coco: dict, dst: Path, images: list[dict]) -> None:
    (dst / "Annotations").mkdir(parents=True)
    (dst / "JPEGImages").mkdir()
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for im in images:
        shutil.copy(root / "images" / im["file_name"], dst / "JPEGImages" / im["file_name"])
        objs = "".join(
            f"<object><name>{names[a['category_id']]}</name><bndbox><xmin>{a['bbox'][0] + 1}</xmin>"
            f"<ymin>{a['bbox'][1] + 1}</ymin><xmax>{a['bbox'][0] + a['bbox'][2]}</xmax>"
            f"<ymax>{a['bbox'][1] + a['bbox'][3]}</ymax></bndbox></object>"
            for a in coco["annotations"] if a["image_id"] == im["id"])
        (dst / "Annotations" / (Path(im["file_name"]).stem + ".xml")).write_text(
            f"<annotation><filename>{im['file_name']}</filename><size><width>{im['width']}</width>"
            f"<height>{im['height']}</height></size>{objs}</annotation>")


def _write_labelme(root: Path, coco: dict, dst: Path, images: list[dict]) -> None:
    dst.mkdir(parents=True)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for im in images:
        shutil.copy(root / "images" / im["file_name"], dst / im["file_name"])
        shapes = [{"label": names[a["category_id"]], "shape_type": "rectangle",
                   "points": [[a["bbox"][0], a["bbox"][1]], [a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]]}
                  for a in coco["annotations"] if a["image_id"] == im["id"]]
        (dst / (Path(im["file_name"]).stem + ".json")).write_text(json.dumps(
            {"shapes": shapes, "imagePath": im["file_name"], "imageHeight": im["height"], "imageWidth": im["width"]}))


def _write_source(fmt: str, root: Path, coco: dict, dst: Path, images: list[dict]) -> Path:
    """``images`` of the truth set in ``fmt`` under ``dst``; returns what to pass as the source."""
    if fmt == "coco":
        dst.mkdir(parents=True)
        ids = {im["id"] for im in images}
        part = {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
        (dst / "labels.json").write_text(json.dumps(part))
        shutil.copytree(root / "images", dst / "images")
        return dst / "labels.json"
    if fmt == "voc":
        _write_voc(root, coco, dst, images)
    elif fmt == "yolo":
        ids = {im["id"] for im in images}
        _write_yolo(root, {**coco, "images": images,
                           "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}, dst)
    else:
        _write_labelme(root, coco, dst, images)
    return dst


@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo", "labelme"])
def test_own_train_val_split_from_two_sources_or_val_from_in_every_format(truth, tmp_path: Path, fmt: str) -> None:
    root, coco = truth
    train_ims, val_ims = coco["images"][:4], coco["images"][4:]
    train_src = _write_source(fmt, root, coco, tmp_path / "train", train_ims)
    val_src = _write_source(fmt, root, coco, tmp_path / "val", val_ims)
    common = ["--format", fmt, "--classes", ",".join(CLASSES)]
    assert main(["data", "import", str(train_src), str(val_src), *common, "--out", str(tmp_path / "two")]) == 0
    assert main(["data", "import", str(train_src), "--val-from", str(val_src), *common,
                 "--out", str(tmp_path / "valfrom")]) == 0
    want_val = sorted(im["file_name"] for im in val_ims)
    for out in (tmp_path / "two", tmp_path / "valfrom"):
        val = json.loads((out / "annotations" / "val.json").read_text())
        train = json.loads((out / "annotations" / "train.json").read_text())
        assert sorted(im["file_name"] for im in val["images"]) == want_val
        assert sorted(im["file_name"] for im in train["images"]) == sorted(im["file_name"] for im in train_ims)
        val_boxes = sum(1 for a in coco["annotations"] if a["image_id"] in {im["id"] for im in val_ims})
        assert len(val["annotations"]) == val_boxes
        assert check_target(out / f"{out.name}.yaml").ok


def test_val_from_a_list_file_and_a_yolo_split_folder(truth, tmp_path: Path, capsys) -> None:
    root, coco = truth
    voc = tmp_path / "voc"
    _write_voc(root, coco, voc, coco["images"])
    listed = [Path(im["file_name"]).stem for im in coco["images"][:2]]  # VOC's ImageSets/Main/val.txt: stems
    (tmp_path / "val.txt").write_text("\n".join(listed) + "\n")
    assert main(["data", "import", str(voc), "--format", "voc", "--classes", ",".join(CLASSES),
                 "--val-from", str(tmp_path / "val.txt"), "--out", str(tmp_path / "a")]) == 0
    val = json.loads((tmp_path / "a" / "annotations" / "val.json").read_text())
    assert sorted(Path(im["file_name"]).stem for im in val["images"]) == sorted(listed)
    # a YOLO folder with images/train + images/val: each split given as its own source
    yolo = tmp_path / "yolo"
    _write_yolo(root, {**coco, "images": coco["images"][:4]}, yolo, "train")
    _write_yolo(root, {**coco, "images": coco["images"][4:]}, yolo, "val")
    assert main(["data", "import", str(yolo / "images" / "train"), str(yolo / "images" / "val"), "--format", "yolo",
                 "--classes", ",".join(CLASSES), "--out", str(tmp_path / "y")]) == 0
    got = json.loads((tmp_path / "y" / "annotations" / "val.json").read_text())
    ids = {im["id"] for im in coco["images"][4:]}
    assert len(got["annotations"]) == sum(1 for a in coco["annotations"] if a["image_id"] in ids) > 0


def test_a_class_only_in_validation_is_warned_with_counts(truth, tmp_path: Path, capsys) -> None:
    root, coco = truth
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_image = {im["id"]: {names[a["category_id"]] for a in coco["annotations"] if a["image_id"] == im["id"]}
                 for im in coco["images"]}
    target = names[coco["annotations"][0]["category_id"]]
    val_ims = [im for im in coco["images"] if target in per_image[im["id"]]]
    train_ims = [im for im in coco["images"] if target not in per_image[im["id"]]]
    n_boxes = sum(1 for a in coco["annotations"] if names[a["category_id"]] == target)
    train_src = _write_source("coco", root, coco, tmp_path / "t", train_ims)
    val_src = _write_source("coco", root, coco, tmp_path / "v", val_ims)
    assert main(["data", "import", str(train_src), str(val_src), "--format", "coco", "--classes", ",".join(CLASSES),
                 "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert f"class '{target}' is only in validation ({n_boxes} box(es), 0 in training)" in err


def test_a_refused_import_writes_nothing(truth, tmp_path: Path, capsys) -> None:
    root, coco = truth
    src = root / "annotations" / "all.json"
    common = ["--format", "coco", "--classes", ",".join(CLASSES)]
    # refused after the images were copied (the split): the half-built folder is removed
    assert main(["data", "import", str(src), *common, "--val", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "val fraction must be between 0 and 1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "list.txt").write_text("no_such_image\n")
    assert main(["data", "import", str(src), *common, "--val-from", str(tmp_path / "list.txt"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "match no image of the source: no_such_image" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.txt"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["data", "import", str(src), *common, "--out", str(tmp_path / "full")]) == 2
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]


def test_import_spec_starts_from_the_shipped_base_unless_told_otherwise(truth, tmp_path: Path) -> None:
    import yaml

    root, coco = truth
    src = root / "annotations" / "all.json"
    assert main(["data", "import", str(src), "--format", "coco", "--classes", ",".join(CLASSES),
                 "--out", str(tmp_path / "d" / "line7")]) == 0
    spec = LineSpec.load(tmp_path / "d" / "line7" / "line7.yaml")
    base = Path(__file__).resolve().parents[1] / "base_weights" / "pcb-base-tiny-320.pdparams"
    assert (spec.model_size, spec.image_size, spec.settings.train.pretrained) == ("tiny", 320, str(base))
    raw = yaml.safe_load((tmp_path / "d" / "line7" / "line7.yaml").read_text())
    assert not Path(raw["train"]["pretrained"]).is_absolute()
    assert main(["data", "import", str(src), "--format", "coco", "--classes", ",".join(CLASSES),
                 "--out", str(tmp_path / "e"), "--model-size", "s", "--image-size", "256", "--no-pretrained"]) == 0
    other = LineSpec.load(tmp_path / "e" / "e.yaml")
    assert (other.model_size, other.image_size, other.settings.train.pretrained) == ("s", 256, "")


def _yolo_folder(root: Path, images: dict[str, "np.ndarray"]) -> Path:
    """A YOLO folder with one centred 'dent' box per image (written as the file's own pixel format)."""
    import cv2

    for name, img in images.items():
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / "images" / name), img)
        (root / "labels" / f"{Path(name).stem}.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    (root / "classes.txt").write_text("dent\n")
    return root


def test_16_bit_and_grayscale_images_are_converted_or_kept_and_said_so(tmp_path: Path, capsys) -> None:
    import cv2
    import numpy as np

    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (64, 1))  # 12-bit data in 16-bit files: 0..4080
    gray8 = np.full((64, 256), 77, np.uint8)
    src = _yolo_folder(tmp_path / "src", {"a.png": ramp, "b.tif": ramp[:, ::-1].copy(), "c.png": gray8,
                                          "d.jpg": np.full((64, 256, 3), 90, np.uint8)})
    assert main(["data", "import", "--format", "yolo", str(src), "--out", str(tmp_path / "o"), "--val", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "2 image(s) have 16 bits per sample (largest value 4080: 12-bit data): converted to 8 bits " \
           "(value x 255/4095" in err
    assert "1 image(s) are single-channel grayscale: kept as they are" in err
    a = cv2.imread(str(tmp_path / "o" / "images" / "a.png"), cv2.IMREAD_UNCHANGED)
    b = cv2.imread(str(tmp_path / "o" / "images" / "b.tif"), cv2.IMREAD_UNCHANGED)
    assert a.dtype == b.dtype == np.uint8 and a.shape == (64, 256)
    assert a.max() == 254 and a[0, 128] == round(2048 * 255 / 4095)  # the bit depth's scale, not OpenCV's >> 8
    assert np.array_equal(b, a[:, ::-1])
    assert (cv2.imread(str(tmp_path / "o" / "images" / "c.png"), cv2.IMREAD_UNCHANGED) == gray8).all()
    info = json.loads((tmp_path / "o" / "annotations" / "all.json").read_text())["info"]
    assert info["pixel_conversion"] == {"wide_images": 2, "bits": 12, "scale": round(255 / 4095, 6),
                                        "grayscale_images": 1}
    assert check_target(tmp_path / "o" / "o.yaml").ok


def test_floating_point_images_are_refused_with_the_reason(tmp_path: Path, capsys) -> None:
    import numpy as np

    src = _yolo_folder(tmp_path / "src", {"f.tif": np.random.default_rng(0).random((32, 32)).astype(np.float32)})
    assert main(["data", "import", "--format", "yolo", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "1 image(s) store 32-bit or floating-point samples, e.g. f.tif (32-bit float)" in err
    assert "Convert them to 8- or 16-bit PNG" in err and not (tmp_path / "o").exists()
