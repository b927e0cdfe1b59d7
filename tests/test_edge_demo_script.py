"""scripts/edge_demo.sh: the collector and one edge box run locally on a signed bundle of a real (tiny) PP-YOLOE+
export; the collector receives the reports, the box writes one JSON line per image, both stop cleanly.

The bundle is built the way the kit builds one (compress.bundle.build_bundle, drift reference from the runtime's
own per-frame statistics on the line's images, golden images with the model's own detections).
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "edge_demo.sh"


@pytest.fixture(scope="module")
def demo_bundle(tiny_spec, tiny_export, tmp_path_factory):
    """(bundle .tar.gz, public key, images folder) from the tiny export, host-NMS ONNX model."""
    from compress.bundle import build_bundle, models_from_deploy
    from compress.keys import init_keys, load_private_key
    from edge_runtime.decision import decide
    from edge_runtime.settings import BoxSettings, RuntimeSettings
    from edge_runtime.drift import build_reference
    from edge_runtime.predict import Detector
    from edge_runtime.run import drift_features_of
    from edge_runtime.selftest import expected_record

    base = tmp_path_factory.mktemp("demo_bundle")
    spec, models = models_from_deploy(tiny_export.deploy_json)
    onnx = [m for m in models if m.format == "onnx" and m.nms == "host"]
    assert onnx, f"the tiny export has no host-NMS ONNX model: {[m.path.name for m in models]}"
    det = Detector.from_model(onnx[0].path, backend="onnxruntime", threads=1)
    images = sorted(tiny_spec.paths.images.glob("*.jpg"))
    assert len(images) >= 8
    frames = [cv2.imread(str(p)) for p in images]
    feats = [drift_features_of(img, decide(det(img), det.classes, RuntimeSettings()), len(det.classes)) for img in frames]
    ref = build_reference(feats * 3, class_names=det.classes).save(base / "drift_reference.json")
    golden = [(p, expected_record(det(img), det.classes)) for p, img in zip(images[:2], frames[:2])]
    keys = init_keys(base / "keys")
    bundle_dir = build_bundle(base / "store", "pcb-tiny", "1.0.0", None, onnx, spec.input, spec.postprocess,
                              spec.classes, {"map50": 0.0}, {"method": "none"}, golden, ref,
                              load_private_key(keys.private), settings=BoxSettings())
    return bundle_dir.parent / "1.0.0.tar.gz", keys.public, tiny_spec.paths.images


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEFECTKIT_PY": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _collector_reports(db: Path) -> list[dict]:
    with sqlite3.connect(str(db)) as conn:
        conn.row_factory = sqlite3.Row
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "reports" in tables, tables
        return [dict(r) for r in conn.execute("SELECT * FROM reports")]


def _predictions(work: Path) -> list[dict]:
    files = sorted((work / "edge" / "predictions").glob("*.jsonl"))
    assert files, f"no predictions under {work / 'edge'}"
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def _check_run(proc: subprocess.CompletedProcess, work: Path, images: Path) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    n = len(list(images.glob("*.jpg")))
    rows = _predictions(work)
    assert len(rows) == n, f"{len(rows)} JSON lines for {n} images"
    assert {Path(r["source"]).name for r in rows} == {p.name for p in images.glob("*.jpg")}
    assert all(r["verdict"] in ("OK", "NG") for r in rows)
    reports = _collector_reports(work / "collector.db")
    assert reports, "the collector received no report"
    assert len({r["id"] for r in reports}) == len(reports)
    assert sum(r["frames"] for r in reports) == n, "the reports do not count every inspected frame exactly once"
    assert {json.loads(r["body"])["device_id"] for r in reports} == {"demo-box-01"}
    # the script listed what the collector holds
    assert f"{len(reports)} shown of {len(reports)} reports" in proc.stdout, proc.stdout
    assert f"{n} JSON lines (one per image)" in proc.stderr


def test_demo_runs_collector_and_edge_box_on_the_host(demo_bundle, tmp_path):
    bundle, key, images = demo_bundle
    work = tmp_path / "work"
    proc = _run(["--bundle", str(bundle), "--public-key", str(key), "--images", str(images), "--work", str(work)])
    _check_run(proc, work, images)
    assert "collector on http://127.0.0.1:" in proc.stderr


@pytest.mark.edgebox
def test_demo_runs_the_edge_side_in_the_python39_edge_box(demo_bundle, tmp_path):
    from tests.edgebox import ensure_edgebox

    ensure_edgebox()
    bundle, key, images = demo_bundle
    work = tmp_path / "work"
    proc = _run(["--bundle", str(bundle), "--public-key", str(key), "--images", str(images), "--work", str(work),
                 "--box", "--backend", "onnxruntime"], timeout=300)
    _check_run(proc, work, images)
    assert "edge_box.sh run" in proc.stderr


@pytest.mark.parametrize("where", ["host", pytest.param("box", marks=pytest.mark.edgebox)])
def test_watch_mode_picks_up_new_images_and_stops_cleanly_on_sigterm(demo_bundle, tmp_path, where):
    """--watch: images dropped in while it runs are inspected; when the stop file appears SIGTERM reaches the
    runtime (in the box through the edge_box.sh/unshare/chroot wrappers), which flushes the last report before
    exiting. The camera waits for the runtime to have inspected the first images, not for a time."""
    import shutil
    import threading

    bundle, key, images = demo_bundle
    if where == "box":
        from tests.edgebox import ensure_edgebox

        ensure_edgebox()
    files = sorted(images.glob("*.jpg"))
    watched, work = tmp_path / "camera", tmp_path / "work"
    watched.mkdir()
    for p in files[:4]:  # already there at start (arrived while the box was down)
        shutil.copy(p, watched / p.name)

    stop_file, done = tmp_path / "stop", threading.Event()

    def inspected() -> int:
        return sum(len(f.read_text().splitlines()) for f in (work / "edge" / "predictions").glob("*.jsonl"))

    def camera() -> None:  # the rest arrives while it runs, written under a temporary name, then renamed
        while not done.wait(0.1) and inspected() < 4:
            pass
        for p in files[4:]:
            shutil.copy(p, watched / (p.name + ".part"))
            (watched / (p.name + ".part")).rename(watched / p.name)
        while not done.wait(0.1) and inspected() < len(files):
            pass
        stop_file.touch()

    writer = threading.Thread(target=camera)
    writer.start()
    args = ["--bundle", str(bundle), "--public-key", str(key), "--images", str(watched), "--work", str(work),
            "--watch", "240", "--stop-file", str(stop_file), "--report-interval", "1"] + (
        ["--box", "--backend", "onnxruntime"] if where == "box" else [])
    try:
        proc = _run(args, timeout=300)
    finally:
        done.set()
        writer.join()
    assert stop_file.exists(), "the runtime did not inspect every image within the watch"
    assert "stopped by signal" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    _check_run(proc, work, watched)


def test_help_and_bad_arguments_give_clear_messages(tmp_path, demo_bundle):
    proc = _run(["--help"])
    assert proc.returncode == 0 and "--bundle PATH" in proc.stdout and "--box" in proc.stdout
    assert "set -euo" not in proc.stdout  # only the header comment is shown
    proc = _run(["--bundle", str(tmp_path / "missing.tar.gz"), "--public-key", str(demo_bundle[1])])
    assert proc.returncode == 2
    assert f"bundle {tmp_path / 'missing.tar.gz'} does not exist" in proc.stderr and "--bundle PATH" in proc.stderr
    proc = _run(["--bundle", str(demo_bundle[0]), "--public-key", str(tmp_path / "nokey.pem")])
    assert proc.returncode == 2 and "public key" in proc.stderr and "does not exist" in proc.stderr
    proc = _run(["--frobnicate"])
    assert proc.returncode == 2 and "unknown option --frobnicate (see --help)" in proc.stderr
    proc = _run(["--watch", "soon"])
    assert proc.returncode == 2 and "--watch takes whole seconds" in proc.stderr
