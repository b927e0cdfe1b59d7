"""The arm64 edge box gives the same verdicts on a real bundle's golden images as the x86 box.

What runs: the kit's base detector (PP-YOLOE+ tiny, 320 px, FP32 ONNX without NMS) in a signed bundle with two golden
images (one NG, one OK) whose expectations come from paddle.inference on the host. Both boxes run it through their own code (``edge_runtime.cli``,
the ``python -m edge_runtime predict --bundle`` entry point, then the golden self-test) with their own ONNX Runtime
1.19.2 wheel: x86_64 natively, aarch64 under qemu-user emulation (this host has no ARM CPU: qemu stands in for one,
and executes the real aarch64 wheel's NEON kernels). Paddle Lite's ARM ``.nb`` is not covered: PyPI has no aarch64
paddlelite, so the arm64 box has ONNX Runtime only.

Tolerance, why: both sides run the same FP32 graph, but through different MLAS kernels (AVX2/FMA vs NEON), which sum
in another order. Measured on 2026-11-30 over every anchor of both golden images (raw outputs, before NMS): scores
differ by up to 3.6e-7, boxes by up to 1.2e-4 px; after the wire form's rounding the detections were identical. The
assertions allow 1e-3 in score and 0.05 px in box (320 px input): three orders of magnitude of headroom for other
kernels or CPUs, still far below anything that moves a verdict (threshold 0.5) and below the golden self-test's own
tolerance (0.05 in score, 2 px).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from compress.bundle import ModelFile, build_bundle
from compress.keys import load_private_key
from edge_runtime.decision import decide
from edge_runtime.drift import build_reference
from edge_runtime.predict import Detector
from edge_runtime.run import drift_features_of
from edge_runtime.selftest import expected_record
from edge_runtime.settings import BoxSettings, RuntimeSettings
from tests.edgebox import box_run, ensure_edgebox
from tests.runkit import make_keys

pytestmark = [pytest.mark.edgebox, pytest.mark.timeout(3900)]  # the first arm64 build (once per machine) is in it

SCORE_TOL = 1e-3
BOX_TOL_PX = 0.05
# Detections under this score are compared only through the verdict: they are NMS leftovers near the 0.01 output
# floor and the top-k cut, where a 1e-6 score difference may swap which of two near-equal boxes survives.
COMPARE_FLOOR = 0.1

# Runs inside a box: the box's own CLI (predict over the golden images, settings from the verified manifest), then
# the golden self-test against the paddle.inference expectations; one interpreter, because every start under qemu
# costs seconds.
_IN_BOX = """
import json, platform, sys
import numpy as np, onnxruntime
from edge_runtime.bundle import load_public_key, verify_bundle
from edge_runtime.cli import main
from edge_runtime.selftest import bundle_detector, choose_model, self_test
rc = main(["predict", "--bundle", {bundle!r}, "--public-key", {key!r}, "--source", {source!r},
           "--out", {out!r}, "--threads", "1"{extra}])
manifest = verify_bundle({bundle!r}, load_public_key({key!r}))
backend, model = choose_model(manifest)
det = bundle_detector(manifest, model, backend, threads=1)
# Keep the self-test's raw model outputs (every anchor's box and score, before NMS and before the wire form's
# rounding) instead of running the golden images a third time: each costs seconds under qemu.
raw, infer = [], det.backend.infer
det.backend.infer = lambda feeds: raw.append(infer(feeds)) or raw[-1]
report = self_test(manifest, detectors=[det], threads=1)
np.savez({raw!r}, **{{"g%d_out%d" % (i, j): o for i, outs in enumerate(raw) for j, o in enumerate(outs)}})
try:
    import paddlelite  # noqa: F401
    lite = True
except ImportError:
    lite = False
print(json.dumps({{"machine": platform.machine(), "python": platform.python_version(), "rc": rc,
                  "ort": onnxruntime.__version__, "paddlelite": lite, "selftest_ok": report.ok,
                  "selftest": report.line()}}))
"""


def _pick_golden(images: list[Path], reference: Detector, cfg: RuntimeSettings) -> list[Path]:
    """One NG image and one OK image (by the paddle reference), so equal verdicts mean something both ways; two
    only, because each image costs about 10 s per pass under qemu on this contended host."""
    ng, ok = [], []
    for path in images:
        verdict = decide(reference(cv2.imread(str(path))), reference.classes, cfg)
        (ng if verdict.is_ng else ok).append(path)
        if ng and ok:
            return [ng[0], ok[0]]
    raise AssertionError(f"the base detector gave {len(ng)} NG / {len(ok)} OK images: need one of each")


@pytest.fixture(scope="module")
def arm_bundle(base_run, base_export, tmp_path_factory):
    """A signed bundle of the base detector's FP32 ONNX (host NMS), 2 golden images expected by paddle.inference."""
    from detect.run_settings import load_run_spec

    base = tmp_path_factory.mktemp("armbox")
    spec = load_run_spec(base_run.root)
    settings = BoxSettings()
    onnx = Detector.from_model(base_export.files["onnx_nonms"], backend="onnxruntime", threads=1)
    paddle_ref = Detector.from_model(base_export.files["paddle_nonms"], backend="paddle", threads=1)
    images = sorted(spec.paths.images.iterdir())
    golden = _pick_golden(images, paddle_ref, settings.runtime)
    feats = [drift_features_of(img, decide(onnx(img), onnx.classes, settings.runtime), len(onnx.classes))
             for img in (cv2.imread(str(p)) for p in images[:32])]  # 30 is the minimum
    ref = build_reference(feats, class_names=onnx.classes).save(base / "drift_reference.json")
    expected = [expected_record(paddle_ref(cv2.imread(str(p))), onnx.classes) for p in golden]
    keys = make_keys(base)
    bundle = build_bundle(
        base / "store", spec.line, "1.0.0", None,
        [ModelFile(base_export.files["onnx_nonms"], "onnx", "any", "fp32", "host", "1.19.2")],
        onnx.spec.input, onnx.spec.postprocess, onnx.classes, {"map50": 0.0}, {"method": "none"},
        list(zip(golden, expected)), ref, load_private_key(keys.private), settings=settings)
    return bundle, keys.public, [p.name for p in golden]


def _run_in(arch: str, bundle: Path, public: Path, work: Path, extra: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """(the box's summary, its predictions by image name, its raw model outputs) on the bundle's golden images.
    ``extra``: more predict flags for one side (how the test was broken on purpose: a threshold on one side)."""
    out, raw = work / f"preds-{arch}.jsonl", work / f"raw-{arch}.npz"
    code = _IN_BOX.format(bundle=str(bundle), key=str(public), source=str(bundle / "golden"), out=str(out),
                          raw=str(raw), extra="".join(f", {a!r}" for a in extra))
    proc = box_run(["python", "-c", textwrap.dedent(code)], [work, bundle.parent, public.parent], arch, timeout=600)
    assert proc.returncode == 0, f"{arch} box exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    preds = {}
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        preds[Path(rec["source"]).name] = rec
    with np.load(raw) as npz:
        return summary, preds, dict(npz)


def _unmatched(a: list[dict], b: list[dict], worst: list[float]) -> list[dict]:
    """Detections of ``a`` at or above COMPARE_FLOOR with no twin in ``b`` (same class, score within SCORE_TOL, box
    within BOX_TOL_PX); one just above the floor may lack its twin, since the twin may sit just below it.
    ``worst`` collects the largest score and box differences of the matched pairs."""
    missing = []
    for da in a:
        if da["score"] < COMPARE_FLOOR:
            continue
        diffs = [(abs(da["score"] - db["score"]), float(np.abs(np.subtract(da["box"], db["box"])).max()))
                 for db in b if db["class_id"] == da["class_id"] and db["counted"] == da["counted"]]
        twin = min(diffs, default=None, key=lambda d: d[0] / SCORE_TOL + d[1] / BOX_TOL_PX)
        if twin is not None and twin[0] <= SCORE_TOL and twin[1] <= BOX_TOL_PX:
            worst[0], worst[1] = max(worst[0], twin[0]), max(worst[1], twin[1])
        elif da["score"] >= COMPARE_FLOOR + SCORE_TOL:
            missing.append({**da, "closest": twin})
    return missing


def test_arm64_box_verdicts_equal_the_x86_box(arm_bundle, tmp_path):
    bundle, public, golden_names = arm_bundle
    ensure_edgebox(arch="amd64")
    ensure_edgebox(arch="arm64")
    x86, x86_preds, x86_raw = _run_in("amd64", bundle, public, tmp_path)
    arm, arm_preds, arm_raw = _run_in("arm64", bundle, public, tmp_path)
    print("x86 box:", x86, "\narm64 box:", arm)

    assert (x86["machine"], arm["machine"]) == ("x86_64", "aarch64")  # the arm box really runs aarch64 code
    assert x86["ort"] == arm["ort"] == "1.19.2" and x86["python"].startswith("3.9.") and arm["python"].startswith("3.9.")
    assert arm["paddlelite"] is False and x86["paddlelite"] is True  # no aarch64 paddlelite wheel exists
    assert x86["rc"] == arm["rc"] == 0
    assert x86["selftest_ok"] and arm["selftest_ok"], (x86["selftest"], arm["selftest"])  # both match paddle.inference

    predicted = sorted(x86_preds)
    assert sorted(arm_preds) == sorted(x86_preds) and len(predicted) == len(golden_names) == 2
    verdicts = {n: (x86_preds[n]["verdict"], arm_preds[n]["verdict"]) for n in predicted}
    assert all(a == b for a, b in verdicts.values()), verdicts
    assert sorted(v for v, _ in verdicts.values()) == ["NG", "OK"]  # the golden set has both outcomes

    worst = [0.0, 0.0]
    compared = 0
    for name in predicted:
        a, b = x86_preds[name]["detections"], arm_preds[name]["detections"]
        compared += sum(d["score"] >= COMPARE_FLOOR for d in a)
        assert not _unmatched(a, b, worst), (name, "x86 detections missing or off on arm64", _unmatched(a, b, worst))
        assert not _unmatched(b, a, worst), (name, "arm64 detections missing or off on x86", _unmatched(b, a, worst))
    print(f"x86 vs arm64: {compared} detections compared (score >= {COMPARE_FLOOR}), max |score| diff {worst[0]:.2e}, "
          f"max box diff {worst[1]:.2e} px")
    assert compared >= 1  # the NG image's detections at least

    # every anchor of every golden image, before NMS and before the wire form's rounding (5 decimals, 0.01 px)
    assert sorted(x86_raw) == sorted(arm_raw) and len(x86_raw) == 2 * len(golden_names)
    raw_box = max(float(np.abs(x86_raw[k] - arm_raw[k]).max()) for k in x86_raw if k.endswith("out0"))
    raw_score = max(float(np.abs(x86_raw[k] - arm_raw[k]).max()) for k in x86_raw if k.endswith("out1"))
    print(f"raw outputs, all anchors: max |score| diff {raw_score:.2e}, max box diff {raw_box:.2e} px")
    assert raw_score <= SCORE_TOL and raw_box <= BOX_TOL_PX


def test_arm64_box_without_qemu_or_proot_names_the_debian_packages(tmp_path):
    """Without binfmt_misc the arm64 box needs qemu-user-static and proot: the error says so and how to get them."""
    import os
    import shutil
    import subprocess

    from tests.edgebox import SCRIPT

    tools = tmp_path / "bin"  # a PATH with what the script needs to get there, but no qemu-aarch64-static or proot
    tools.mkdir()
    for name in ("bash", "id", "dirname", "dpkg", "uname"):
        os.symlink(shutil.which(name), tools / name)
    root = tmp_path / "box"
    root.mkdir()
    (root / ".defectkit-edgebox-recipe").write_text("x\n")
    env = {"PATH": str(tools), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), "--arch", "arm64", "run", "--root", str(root), "--", "true"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert "qemu-aarch64-static and proot" in proc.stderr and "Debian packages qemu-user-static proot" in proc.stderr
    assert "scripts/edge_box.sh --arch arm64 build --install-deps" in proc.stderr

    bad = subprocess.run(["bash", str(SCRIPT), "--arch", "mips", "path"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown architecture (use amd64 or arm64)" in bad.stderr
    paths = [subprocess.run(["bash", str(SCRIPT), *a, "path"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DEFECTKIT_CACHE": str(tmp_path)}).stdout.strip()
             for a in ([], ["--arch", "amd64"], ["--arch", "arm64"])]
    assert paths == [str(tmp_path / "edgebox-bullseye-py39")] * 2 + [str(tmp_path / "edgebox-bullseye-py39-arm64")]
