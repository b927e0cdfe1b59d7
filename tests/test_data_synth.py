"""Synthetic PCB line: determinism, layout, class balance, box sizes, line spec, CLI."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from detect.data.synth import generate_line
from detect.linespec import LineSpec
from edge_runtime.errors import ConfigError

PKU = ["missing_hole", "mouse_bite", "open_circuit", "short", "spur", "spurious_copper"]


@pytest.fixture(scope="module")
def line_a(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_a")
    generate_line(out, count=24, seed=3, progress=False)
    return out


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_layout_and_spec(line_a: Path) -> None:
    spec = LineSpec.load(line_a / "pcb-demo.yaml")
    assert spec.classes == PKU
    assert spec.image_size == 320 and spec.model_size == "tiny"
    assert spec.paths.root == line_a.resolve()
    coco = _load(line_a / "annotations" / "all.json")
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5, 6]
    assert [c["name"] for c in coco["categories"]] == PKU
    assert all(c["supercategory"] == "defect" for c in coco["categories"])
    assert len(coco["images"]) == 24
    for im in coco["images"]:
        img = cv2.imread(str(line_a / "images" / im["file_name"]))
        assert img is not None and img.shape == (320, 320, 3)
        assert im["file_name"].endswith(".jpg")
    # train + val partition all images, and the split keeps both sides non-empty
    train, val = _load(spec.paths.train), _load(spec.paths.val)
    ids = sorted(i["id"] for i in train["images"] + val["images"])
    assert ids == sorted(i["id"] for i in coco["images"])
    assert train["images"] and val["images"]
    assert train["categories"] == coco["categories"]


def test_boxes_defect_free_and_balance(line_a: Path) -> None:
    coco = _load(line_a / "annotations" / "all.json")
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    assert sum(1 for im in coco["images"] if im["id"] not in per_image) == round(24 * 0.12)
    assert max(per_image.values()) <= 4
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert 14 <= w <= 48 and 14 <= h <= 48, a
        assert x >= 0 and y >= 0 and x + w <= 320 and y + h <= 320
        assert a["iscrowd"] == 0 and a["area"] == pytest.approx(w * h, abs=0.05)
    counts = Counter(a["category_id"] for a in coco["annotations"])
    assert set(counts) == set(range(1, 7))
    assert max(counts.values()) - min(counts.values()) <= 2


def test_defect_pixels_differ_from_board(line_a: Path) -> None:
    """A defect box must contain copper (missing hole, spur, ...) or a cut: not just bare mask."""
    coco = _load(line_a / "annotations" / "all.json")
    for a in coco["annotations"][:12]:
        im = next(i for i in coco["images"] if i["id"] == a["image_id"])
        img = cv2.imread(str(line_a / "images" / im["file_name"]))
        x, y, w, h = (int(v) for v in a["bbox"])
        crop = img[y:y + h, x:x + w].astype(int)
        redness = crop[..., 2] - crop[..., 1]  # copper is red > green, solder mask is green > red
        assert (redness > 20).mean() > 0.05, a


def test_deterministic_by_seed(line_a: Path, tmp_path: Path) -> None:
    generate_line(tmp_path, count=24, seed=3, progress=False)
    for name in ("all.json", "train.json", "val.json"):
        assert (tmp_path / "annotations" / name).read_bytes() == (line_a / "annotations" / name).read_bytes()
    for f in sorted((line_a / "images").iterdir())[:6]:
        assert (tmp_path / "images" / f.name).read_bytes() == f.read_bytes()
    other = tmp_path / "other"
    generate_line(other, count=24, seed=4, progress=False)
    assert (other / "annotations" / "all.json").read_bytes() != (line_a / "annotations" / "all.json").read_bytes()


def test_png_non_square_and_no_defect_free(tmp_path: Path) -> None:
    spec = generate_line(tmp_path, line="wide", count=6, size=(384, 256), seed=1, defect_free_fraction=0.0,
                         image_format="png", progress=False)
    assert spec.image_size == 384 and (tmp_path / "wide.yaml").is_file()
    coco = _load(tmp_path / "annotations" / "all.json")
    assert {a["image_id"] for a in coco["annotations"]} == {im["id"] for im in coco["images"]}
    img = cv2.imread(str(tmp_path / "images" / coco["images"][0]["file_name"]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (256, 384, 3)
    assert np.std(img) > 10


@pytest.mark.parametrize(
    "kwargs, words",
    [({"count": 1}, "--count"), ({"image_format": "gif"}, "--format"), ({"defect_free_fraction": 1.5}, "--defect-free"),
     ({"size": (20, 20)}, "--size")],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        generate_line(tmp_path, progress=False, **kwargs)


def test_cli(tmp_path: Path, capsys) -> None:
    from defectkit.cli import main

    code = main(["synth", "--out", str(tmp_path), "--count", "4", "--seed", "2", "--line", "cli-line", "--format", "png"])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(printed) == (tmp_path / "cli-line.yaml").resolve()
    assert len(list((tmp_path / "images").glob("*.png"))) == 4
    assert main(["synth", "--out", str(tmp_path), "--count", "1"]) == 2
    assert "--count must be at least 2" in capsys.readouterr().err


def test_example_line_specs_load() -> None:
    lines = Path(__file__).resolve().parents[1] / "lines"
    demo = LineSpec.load(lines / "pcb-demo.yaml")
    assert demo.classes == PKU and demo.model_size == "tiny" and demo.image_size == 320
    surface = LineSpec.load(lines / "example-surface.yaml")
    assert surface.settings.runtime.class_thresholds == {"stain": 0.6} and surface.settings.data.val_fraction == 0.25


def test_rerun_replaces_own_boards_but_never_foreign_files(tmp_path: Path) -> None:
    generate_line(tmp_path, line="re", count=6, progress=False)
    generate_line(tmp_path, line="re", count=3, progress=False)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"re_{i:05d}.jpg" for i in range(3)]
    (tmp_path / "images" / "customer.jpg").write_bytes(b"precious")
    from edge_runtime.errors import UserInputError

    with pytest.raises(UserInputError, match="customer.jpg"):
        generate_line(tmp_path, line="re", count=3, progress=False)
    assert (tmp_path / "images" / "customer.jpg").read_bytes() == b"precious"
