"""data check: every fault reported at once with file and record; --fix writes a clean copy only."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from defectkit.cli import main
from detect.data.check import check_dataset, check_target
from detect.data.fix import fix_dataset
from detect.data.synth import generate_line
from edge_runtime.errors import DataError, UserInputError


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    generate_line(out, line="chk", count=10, seed=5, progress=False)
    return out


@pytest.fixture()
def broken(tmp_path: Path) -> Path:
    """A copy of the clean line with one of each fault the brief names."""
    root = tmp_path / "broken"
    generate_line(root, line="chk", count=10, seed=5, progress=False)
    all_json = root / "annotations" / "all.json"
    coco = json.loads(all_json.read_text())
    ims = coco["images"]
    data = (root / "images" / ims[0]["file_name"]).read_bytes()
    (root / "images" / ims[0]["file_name"]).write_bytes(data[: len(data) // 2])  # truncated JPEG
    (root / "images" / ims[1]["file_name"]).unlink()  # listed but missing
    (root / "images" / ims[2]["file_name"]).write_bytes(b"not an image at all")  # unreadable
    nid = max(a["id"] for a in coco["annotations"]) + 1
    extra = [
        {"id": nid, "image_id": ims[3]["id"], "category_id": 1, "bbox": [300, 300, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": nid + 1, "image_id": ims[4]["id"], "category_id": 2, "bbox": [50, 50, -10, 20], "area": 0, "iscrowd": 0},
        {"id": nid + 2, "image_id": ims[5]["id"], "category_id": 99, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": nid + 3, "image_id": 4242, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        {"id": nid + 4, "image_id": ims[6]["id"], "category_id": 3, "bbox": [100, 100, 20, 20], "area": 400, "iscrowd": 0},
        {"id": nid + 4, "image_id": ims[7]["id"], "category_id": 4, "bbox": [150, 150, 20, 20], "area": 400, "iscrowd": 0},
    ]
    coco["annotations"] += extra
    all_json.write_text(json.dumps(coco))
    return root


def test_clean_data_passes(clean: Path, capsys) -> None:
    report = check_target(clean / "chk.yaml")
    assert report.ok, report.format()
    assert report.images == 10 and report.classes[0] == "missing_hole"
    assert main(["data", "check", str(clean / "chk.yaml")]) == 0
    assert "no faults" in capsys.readouterr().out


def test_every_fault_is_named(broken: Path, capsys) -> None:
    all_json = broken / "annotations" / "all.json"
    coco = json.loads(all_json.read_text())
    spec_classes = [c["name"] for c in coco["categories"]]
    report = check_dataset(all_json, broken / "images", spec_classes)
    kinds = report.kinds()
    for kind in ("truncated_image", "missing_image", "unreadable_image", "box_out_of_bounds", "box_non_positive",
                 "unknown_category", "dangling_annotation", "duplicate_annotation_id"):
        assert kinds[kind] >= 1, (kind, report.format())
    ims = coco["images"]
    by_kind = {f.kind: f for f in report.faults}
    assert ims[0]["file_name"] in by_kind["truncated_image"].record
    assert ims[1]["file_name"] in by_kind["missing_image"].record
    assert "4242" in by_kind["dangling_annotation"].message
    assert "99" in by_kind["unknown_category"].message
    assert all(f.file == str(all_json) for f in report.faults)
    with pytest.raises(DataError, match="truncated_image"):
        report.raise_if_faulty()
    assert main(["data", "check", str(broken / "chk.yaml")]) == 2
    out = capsys.readouterr().out
    assert "box_out_of_bounds" in out and "--fix" in out


def test_class_mismatch_and_duplicates(clean: Path, tmp_path: Path) -> None:
    coco = json.loads((clean / "annotations" / "all.json").read_text())
    coco["categories"][0]["name"] = "hole_missing"
    coco["categories"] = coco["categories"][::-1]
    coco["images"].append(dict(coco["images"][0]))
    ann = tmp_path / "dup.json"
    ann.write_text(json.dumps(coco))
    report = check_dataset(ann, clean / "images", ["missing_hole", "mouse_bite", "open_circuit", "short", "spur", "spurious_copper"])
    kinds = report.kinds()
    assert kinds["class_mismatch"] == 1 and kinds["duplicate_image_id"] == 2 and kinds["duplicate_file_name"] == 2
    msg = next(f.message for f in report.faults if f.kind == "class_mismatch")
    assert "hole_missing" in msg and "missing_hole" in msg
    # order alone is not a fault: names are matched
    coco["categories"][-1]["name"] = "missing_hole"
    coco["images"].pop()
    ann.write_text(json.dumps(coco))
    rep2 = check_dataset(ann, clean / "images", ["missing_hole", "mouse_bite", "open_circuit", "short", "spur", "spurious_copper"])
    assert rep2.ok and any("order" in n for n in rep2.notes)


def test_fix_repairs_copy_and_leaves_original(broken: Path, tmp_path: Path, capsys) -> None:
    before = _tree_digest(broken)
    out = tmp_path / "fixed"
    assert main(["data", "check", str(broken / "chk.yaml"), "--fix", str(out)]) == 2
    assert _tree_digest(broken) == before  # the original is never modified
    report = json.loads((out / "fix_report.json").read_text())
    actions = [(c["action"], c["reason"]) for c in report["changes"]]
    assert sum(a == "drop_image" for a, _ in actions) == 3
    assert any(a == "clip_box" for a, _ in actions)
    assert any("non-positive" in r for _, r in actions)
    assert any("unknown category_id 99" in r for _, r in actions)
    assert any("dangling" in r for _, r in actions)
    assert any(a == "renumber_annotation" for a, _ in actions)
    assert main(["data", "check", str(out / "chk.yaml")]) == 0
    fixed = json.loads((out / "annotations" / "all.json").read_text())
    assert len(fixed["images"]) == 7
    assert (out / "annotations" / "train.json").is_file() and (out / "annotations" / "val.json").is_file()
    # the broken original is refused before training; the repaired copy passes the same gate and every training
    # sample of it goes through ppdet's dataset and the kit's seeded loader with all augmentations (no training)
    from detect.augment_preview import preview_samples
    from detect.linespec import LineSpec
    from detect.preflight import check_data

    assert main(["train", str(broken / "chk.yaml"), "--runs", str(tmp_path / "runs"), "--name", "bad"]) == 2
    assert not (tmp_path / "runs").exists()
    spec = LineSpec.load(out / "chk.yaml").with_cli({"train": {"batch_size": 2}})
    n_train = check_data(spec)
    samples = preview_samples(spec, n_train)
    boxes = sum(len(b) for _, b, _ in samples)
    train_coco = json.loads((out / "annotations" / "train.json").read_text())
    assert len(samples) == n_train == len(train_coco["images"])
    assert boxes == len(train_coco["annotations"]) > 0  # every repaired box survives the reader


def test_fix_refuses_in_place(broken: Path) -> None:
    coco = json.loads((broken / "annotations" / "all.json").read_text())
    names = [c["name"] for c in coco["categories"]]
    with pytest.raises(UserInputError, match="never modified"):
        fix_dataset(broken / "annotations" / "all.json", broken / "images", names, broken)


def test_bad_json_and_bad_target(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    report = check_dataset(bad, tmp_path, None)
    assert report.kinds()["bad_json"] == 1 and "not valid JSON" in report.faults[0].message
    assert main(["data", "check", str(tmp_path / "nothing.txt")]) == 2
    assert "not a line spec" in capsys.readouterr().err
