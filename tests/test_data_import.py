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
