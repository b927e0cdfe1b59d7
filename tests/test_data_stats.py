"""data stats (text + PNG) and data split (stratified, deterministic, atomic files)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import pytest

from defectkit.cli import main
from detect.data.check import inspect_image
from detect.data.coco import make_coco
from detect.data.foreign import make_foreign_coco
from detect.data.split import split_dataset, stratified_split
from detect.data.stats import dataset_stats
from detect.data.synth import generate_line
from edge_runtime.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stats")
    generate_line(root, line="st", count=20, seed=2, progress=False)
    return root


def test_stats_text_and_png(line: Path, tmp_path: Path, capsys) -> None:
    coco = json.loads((line / "annotations" / "all.json").read_text())
    st = dataset_stats(line / "annotations" / "all.json")
    assert sum(st.instances.values()) == len(coco["annotations"])
    assert st.defect_free == len(coco["images"]) - len({a["image_id"] for a in coco["annotations"]})
    assert st.image_sizes == Counter({(320, 320): 20})
    png = tmp_path / "stats.png"
    assert main(["data", "stats", str(line / "st.yaml"), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    for name in st.classes:
        assert name in out
    assert "box size" in out and "320x320 (20)" in out
    img = cv2.imread(str(png))
    assert img is not None and img.shape[1] > 600


def test_stats_count_boxes_thinner_than_the_stride_at_the_model_input(capsys, tmp_path: Path) -> None:
    """A 10 px wide pit on a 640 px wide frame is 5 px at a 320 px input: thinner than the 8 px stride."""
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 640, "height": 160}],
            "categories": [{"id": 1, "name": "pit"}, {"id": 2, "name": "stain"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 60]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 10, 20, 60]},
                            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [200, 10, 40, 5]}]}
    st = dataset_stats(coco, input_size=320)
    assert st.thin == {"pit": 1, "stain": 0}  # the stain is 5 px tall on the frame, 10 px at the input
    assert "thin at 320 px" in st.format() and "1 box(es) narrower than the 8 px stride" in st.format()
    assert dataset_stats(coco).thin == {} and "thin" not in dataset_stats(coco).format()


def test_stats_foreign_mixed_sizes(tmp_path: Path) -> None:
    spec = make_foreign_coco(tmp_path / "f")
    st = dataset_stats(tmp_path / "f" / "annotations" / "all.json", ["scratch", "dent", "stain"])
    assert len(st.image_sizes) >= 3 and st.defect_free >= 1
    assert st.classes == ["scratch", "dent", "stain"]
    assert spec.is_file()


def test_split_stratified_and_deterministic(line: Path) -> None:
    coco = json.loads((line / "annotations" / "all.json").read_text())
    tr1, va1 = stratified_split(coco, 0.3, seed=5)
    tr2, va2 = stratified_split(coco, 0.3, seed=5)
    assert tr1 == tr2 and va1 == va2
    ids = [im["id"] for im in tr1["images"]] + [im["id"] for im in va1["images"]]
    assert sorted(ids) == sorted(im["id"] for im in coco["images"])
    assert 4 <= len(va1["images"]) <= 8
    free = {im["id"] for im in coco["images"]} - {a["image_id"] for a in coco["annotations"]}
    assert free & {im["id"] for im in va1["images"]} or len(free) < 2  # defect-free images reach val too
    _, va3 = stratified_split(coco, 0.3, seed=6)
    assert va3 != va1


def test_split_rare_class_reaches_val() -> None:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in range(1, 21)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0} for i in range(1, 19)]
    anns += [{"id": 19, "image_id": 19, "category_id": 2, "bbox": [0, 0, 5, 5]},
             {"id": 20, "image_id": 20, "category_id": 2, "bbox": [0, 0, 5, 5]}]
    coco = make_coco(images, anns, ["common", "rare"])
    for seed in range(5):
        train, val = stratified_split(coco, 0.2, seed)
        assert {a["category_id"] for a in val["annotations"]} == {1, 2}
        assert {a["category_id"] for a in train["annotations"]} == {1, 2}


def test_split_cli_and_errors(line: Path, tmp_path: Path, capsys) -> None:
    assert main(["data", "split", str(line / "st.yaml"), "--val", "0.5", "--seed", "1"]) == 0
    val = json.loads((line / "annotations" / "val.json").read_text())
    assert len(val["images"]) == 10
    assert not list((line / "annotations").glob(".*.tmp"))  # atomic writes leave no temporaries
    with pytest.raises(ConfigError, match="between 0 and 1"):
        split_dataset(line, 1.5)
    one = make_coco([{"id": 1, "file_name": "a.jpg", "width": 1, "height": 1}], [], ["x"])
    with pytest.raises(DataError, match="at least 2"):
        stratified_split(one, 0.2)


def test_truncated_png_detected(line: Path, tmp_path: Path) -> None:
    img = cv2.imread(str(next((line / "images").iterdir())))
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), img)
    assert inspect_image(png).state == "ok"
    data = png.read_bytes()
    png.write_bytes(data[: int(len(data) * 0.8)])
    assert inspect_image(png).state in ("truncated", "unreadable")
    assert inspect_image(tmp_path / "none.png").state == "missing"
