"""Hard examples leave the collector as a pre-labelled data folder; a retrain takes them only once reviewed.

Real SQLite store, real JPEG files, the real CLI; the parent line is a tiny synthetic one (no training).
"""
from __future__ import annotations

import contextlib
import io
import json
import uuid

import cv2
import numpy as np
import pytest

from edge_runtime.errors import DataError
from edge_runtime.hard_examples import SCHEMA


def _store_hard_example(conn, data_dir, *, device, score, detections, when):
    from fleet import store

    img = np.full((96, 128, 3), 40, np.uint8)
    cv2.rectangle(img, (10, 10), (40, 30), (0, 200, 0), -1)
    hid = uuid.uuid4().hex
    path = data_dir / f"{hid}.jpg"
    ok, buf = cv2.imencode(".jpg", img)
    path.write_bytes(buf.tobytes())
    meta = {"schema": SCHEMA, "id": hid, "device_id": device, "line": "pcb-tiny", "bundle_version": "1.0.0",
            "time": when, "max_score": score, "detections": detections}
    store.insert_hard_example(conn, meta=meta, image_path=str(path), image_sha256="0" * 64, image_bytes=path.stat().st_size)
    return hid


def _cli(*args):
    from defectkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["collector", *args])
    return code, out.getvalue() + err.getvalue()


@pytest.fixture()
def db(tmp_path):
    from fleet import store

    path = tmp_path / "fleet.db"
    (tmp_path / "he").mkdir()
    with store.session(path=path) as conn:
        _store_hard_example(conn, tmp_path / "he", device="box1", score=0.45, when="2026-11-22T10:00:00Z",
                            detections=[{"class": "short", "score": 0.45, "box": [10.0, 10.0, 40.0, 30.0]},
                                        {"class": "spur", "score": 0.12, "box": [50.0, 50.0, 60.0, 60.0]}])
        _store_hard_example(conn, tmp_path / "he", device="box2", score=0.55, when="2026-11-22T11:00:00Z",
                            detections=[{"class": "scratch", "score": 0.55, "box": [5.0, 6.0, 25.0, 36.0]}])
    return path


def test_export_writes_prelabels_in_the_line_order_and_never_overwrites(db, tmp_path):
    out = tmp_path / "hard"
    code, text = _cli("export-hard-examples", "--db", str(db), "--line", "pcb-tiny", "--out", str(out),
                      "--classes", "missing_hole,short,spur")
    assert code == 0, text
    assert "2 hard examples, 2 pre-labelled boxes" in text and "retrain --from RUN --add" in text
    coco = json.loads((out / "annotations" / "all.json").read_text())
    assert [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])] == \
        ["missing_hole", "short", "spur", "scratch"]  # the line's order, then classes only the model named
    assert coco["info"]["reviewed"] is False
    assert [(a["category_id"], a["bbox"]) for a in coco["annotations"]] == [(2, [10.0, 10.0, 30.0, 20.0]),
                                                                            (4, [5.0, 6.0, 20.0, 30.0])]
    assert all((out / "images" / im["file_name"]).is_file() and im["width"] == 128 and im["height"] == 96
               for im in coco["images"])
    code, text = _cli("export-hard-examples", "--db", str(db), "--line", "pcb-tiny", "--out", str(out))
    assert code == 2 and "never overwrites labelling work" in text
    code, text = _cli("export-hard-examples", "--db", str(db), "--line", "other", "--out", str(tmp_path / "x"))
    assert code == 2 and "no hard examples of line 'other'" in text
    code, text = _cli("export-hard-examples", "--db", str(tmp_path / "missing.db"), "--line", "x", "--out", str(tmp_path / "y"))
    assert code == 2 and "does not exist" in text


def test_retrain_refuses_unreviewed_prelabels_and_takes_reviewed_ones(db, tmp_path):
    from detect.data.coco import load_coco
    from detect.data.synth import generate_line
    from detect.ppyoloe import RunPaths
    from detect.retrain_data import Parent, merge_data

    spec = generate_line(tmp_path / "line", line="pcb-tiny", count=6, size=(96, 96), seed=3, val_fraction=0.34,
                         progress=False, classes=("missing_hole", "short", "spur"))
    parent = Parent(RunPaths(tmp_path / "runs" / "pcb-tiny" / "p"), spec, {})
    out = tmp_path / "hard"
    assert _cli("export-hard-examples", "--db", str(db), "--line", "pcb-tiny", "--out", str(out),
                "--classes", "missing_hole,short,spur", "--device", "box1")[0] == 0
    with pytest.raises(DataError, match="pre-labels nobody has reviewed.*info.reviewed"):
        merge_data(parent, [out], spec.classes, tmp_path / "m1", 1.0, 0)
    ann = out / "annotations" / "all.json"
    coco = json.loads(ann.read_text())
    coco["info"]["reviewed"] = True  # what a labeller does after correcting the boxes
    ann.write_text(json.dumps(coco))
    merged = merge_data(parent, [out], spec.classes, tmp_path / "m2", 1.0, 0)
    train = load_coco(merged.train)
    hard = [im for im in train["images"] if im["file_name"].startswith("add1-")]
    assert len(hard) == 1
    assert [a["category_id"] for a in train["annotations"] if a["image_id"] == hard[0]["id"]] == [2]  # 'short'
