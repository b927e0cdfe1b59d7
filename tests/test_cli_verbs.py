"""Every README verb as a user types it: `defectkit VERB ...` in its own process, in a working folder of its own,
with relative paths, on a tiny line (32 boards, 128x96, 96 px input; training as conftest.TINY_TRAIN).

The verbs are chained the way the README's workflow chains them (synth -> VOC labels -> data import -> check ->
train -> resume -> eval -> export -> compress -> keys -> bundle -> predict / edge box -> collector -> hard examples;
retrain -> lineage; migrate-run), each stage's output fixture-cached per module. `defectkit compress` runs with its
defaults (Paddle Lite step on) while DEFECTKIT_CACHE points at an empty folder, so the edge box is "not available":
the Lite step must be skipped with one warning line and every other result kept. It starts in the background right
after the export (it is the long stage) and the verbs that do not need it run meanwhile.

`defectkit demo` (about 13 minutes) and `defectkit fleet-demo` (a few minutes) are not run here: test_demo.py and
test_fleet_demo.py run their chains; here only `--help` and a refused bad input. Each verb group has one bad input
that must exit 2 (4 for a tampered bundle) with one line naming the fix.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_TRAIN

ROOT = Path(__file__).resolve().parents[1]
CLASSES = "missing_hole,mouse_bite,open_circuit,short,spur,spurious_copper"
TINY = ["--epochs", "1", "--batch-size", str(TINY_TRAIN["batch_size"]), "--lr", str(TINY_TRAIN["lr"]),
        "--set", f"warmup_steps={TINY_TRAIN['warmup_steps']}", "--set", f"multiscale={TINY_TRAIN['multiscale']}"]
pytestmark = pytest.mark.timeout(600)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def kit(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`defectkit ARGS` in its own process, from ``cwd``, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "defectkit", *args], cwd=cwd, env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def refused(proc: subprocess.CompletedProcess, verb: str, *needles: str, code: int = 2) -> str:
    """Exit ``code`` with exactly one line `defectkit VERB: error: ...` (last on stderr) holding every needle."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    head = f"defectkit {verb}: error: "
    assert proc.stderr.count(head) == 1, proc.stderr[-3000:]
    line = proc.stderr[proc.stderr.index(head):].rstrip("\n")
    assert "\n" not in line and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# ---------------------------------------------------------------- the chain (module-scoped, in workflow order)

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("user")


@pytest.fixture(scope="module")
def synth(work):
    proc = kit(work, "synth", "--out", "data/pcb", "--line", "line7", "--count", "32", "--size", "128", "96",
               "--image-size", "96", "--seed", "3", "--val", "0.25")
    return proc


@pytest.fixture(scope="module")
def imported(work, synth):
    """The synthetic boards as a user's Pascal VOC labels, imported the README's way."""
    from tests.test_data_import import _write_voc

    ok(synth)
    coco = json.loads((work / "data/pcb/annotations/all.json").read_text())
    _write_voc(work / "data/pcb", coco, work / "labels/voc", coco["images"])
    return kit(work, "data", "import", "--format", "voc", "labels/voc", "--classes", CLASSES, "--out", "data/line7",
               "--image-size", "96", "--val", "0.25", "--seed", "3")


@pytest.fixture(scope="module")
def trained(work, imported):
    """`train` for one epoch, then `train --resume` of that run (its epoch-1 checkpoint) extended to two."""
    ok(imported)
    first = kit(work, "train", "data/line7/line7.yaml", "--name", "first", *TINY)
    ok(first)
    run = work / "runs/line7/first"
    after_first = {"metrics": json.loads((run / "metrics.json").read_text()),
                   "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())}
    resumed = kit(work, "train", "--resume", "runs/line7/first", "--epochs", "2")
    return {"first": first, "after_first": after_first, "resumed": resumed, "run": run}


@pytest.fixture(scope="module")
def exported(work, trained):
    """`export --run`; then `compress --method ptq` with its defaults starts in the background (no edge box)."""
    ok(trained["resumed"])
    proc = kit(work, "export", "data/line7/line7.yaml", "--run", "runs/line7/first")
    ok(proc)
    (work / "empty_cache").mkdir()
    compress = subprocess.Popen([sys.executable, "-m", "defectkit", "compress", "--method", "ptq", "runs/line7/first"],
                                cwd=work, env=_env(DEFECTKIT_CACHE=str(work / "empty_cache")),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield {"proc": proc, "compress": compress}
    if compress.poll() is None:
        compress.kill()
        compress.communicate()


@pytest.fixture(scope="module")
def compressed(exported):
    out, err = exported["compress"].communicate(timeout=900)
    return subprocess.CompletedProcess(exported["compress"].args, exported["compress"].returncode, out, err)


@pytest.fixture(scope="module")
def keys(work):
    return kit(work, "keys", "init", "--dir", "keys/")


@pytest.fixture(scope="module")
def bundled(work, compressed, keys):
    ok(compressed)
    ok(keys)
    return kit(work, "bundle", "runs/line7/first", "--variant", "ort-int8", "--key", "keys/bundle_signing_key.pem",
               "--out", "bundles/")


@pytest.fixture(scope="module")
def retrained(work, trained):
    """New images of the line, `retrain --from --add` for one epoch, then `retrain --resume` of it to two."""
    ok(trained["resumed"])
    ok(kit(work, "synth", "--out", "data/line7-week12", "--line", "line7", "--count", "12", "--size", "128", "96",
           "--image-size", "96", "--seed", "9"))
    first = kit(work, "retrain", "--from", "runs/line7/first", "--add", "data/line7-week12", "--name", "rt",
                "--epochs", "1", "--set", "batch_size=4", "--set", "multiscale=False", "--set", "warmup_steps=2")
    ok(first)
    run = work / "runs/line7/rt"
    record_after_first = json.loads((run / "retrain.json").read_text())
    resumed = kit(work, "retrain", "--resume", "runs/line7/rt", "--epochs", "2")
    return {"first": first, "record_after_first": record_after_first, "resumed": resumed, "run": run}


# ---------------------------------------------------------------- data

def test_synth_writes_a_line_with_a_spec_that_starts_from_the_base(work, synth):
    assert str(work / "data/pcb/line7.yaml") in ok(synth)
    spec = yaml.safe_load((work / "data/pcb/line7.yaml").read_text())
    assert spec["line"] == "line7" and spec["image_size"] == 96 and ",".join(spec["classes"]) == CLASSES
    assert (work / "data/pcb" / spec["train"]["pretrained"]).resolve() == ROOT / "base_weights/pcb-base-tiny-320.pdparams"
    train = json.loads((work / "data/pcb/annotations/train.json").read_text())
    val = json.loads((work / "data/pcb/annotations/val.json").read_text())
    assert len(train["images"]) + len(val["images"]) == 32 and len(val["images"]) == 8
    assert len(list((work / "data/pcb/images").glob("*.jpg"))) == 32
    again = kit(work, "synth", "--out", "again", "--line", "line7", "--count", "32", "--size", "128", "96",
                "--image-size", "96", "--seed", "3", "--val", "0.25")
    ok(again)  # same seed, same bytes
    assert (work / "again/images/line7_00017.jpg").read_bytes() == (work / "data/pcb/images/line7_00017.jpg").read_bytes()


def test_data_import_voc_then_check_is_clean(work, imported):
    assert str(work / "data/line7/line7.yaml") in ok(imported)
    all_ = json.loads((work / "data/line7/annotations/all.json").read_text())
    src = json.loads((work / "data/pcb/annotations/all.json").read_text())
    assert len(all_["images"]) == 32 and len(all_["annotations"]) == len(src["annotations"]) > 0
    assert [c["name"] for c in sorted(all_["categories"], key=lambda c: c["id"])] == CLASSES.split(",")
    out = ok(kit(work, "data", "check", "data/line7/line7.yaml"))
    assert f"32 image(s), {len(src['annotations'])} box(es): no faults" in out


def test_data_import_of_an_unknown_class_is_refused_with_the_fix(work, imported):
    ok(imported)
    proc = kit(work, "data", "import", "--format", "voc", "labels/voc", "--classes", "missing_hole,short",
               "--out", "data/partial")
    refused(proc, "data", "--drop-unknown")
    assert not (work / "data/partial").exists()


def test_data_check_names_every_fault_and_fix_writes_a_clean_copy(work, imported):
    ok(imported)
    shutil.copytree(work / "data/line7", work / "data/broken")
    coco_path = work / "data/broken/annotations/all.json"
    coco = json.loads(coco_path.read_text())
    victim = coco["images"][0]["file_name"]
    (work / "data/broken/images" / victim).write_bytes(b"not an image")
    coco["annotations"].append({"id": 10_000, "image_id": coco["images"][1]["id"], "category_id": 1,
                                "bbox": [500, 500, 20, 20], "area": 400, "iscrowd": 0})
    coco_path.write_text(json.dumps(coco))
    bad = kit(work, "data", "check", "data/broken/line7.yaml")
    assert bad.returncode == 2, bad.stderr
    assert victim in bad.stdout + bad.stderr and "10000" in bad.stdout + bad.stderr
    before = coco_path.read_bytes()
    fixed = kit(work, "data", "check", "data/broken/line7.yaml", "--fix", "data/line7-fixed")
    assert fixed.returncode == 2, fixed.stderr  # the original's faults are still reported; the copy is repaired
    assert "repaired copy written to data/line7-fixed" in fixed.stdout and coco_path.read_bytes() == before
    report = json.loads((work / "data/line7-fixed/fix_report.json").read_text())
    assert report["kept"]["images"] == 31
    assert any(c["action"] == "drop_image" and victim in c["record"] for c in report["changes"])
    assert any("id=10000" in c["record"] for c in report["changes"])
    fixed_coco = json.loads((work / "data/line7-fixed/annotations/all.json").read_text())
    assert victim not in {im["file_name"] for im in fixed_coco["images"]}
    assert 10_000 not in {a["id"] for a in fixed_coco["annotations"]}
    spec = next((work / "data/line7-fixed").glob("*.yaml"))
    assert "no faults" in ok(kit(work, "data", "check", str(spec.relative_to(work))))


def test_data_split_and_stats(work, imported):
    ok(imported)
    shutil.copytree(work / "data/line7", work / "data/resplit")
    out = ok(kit(work, "data", "split", "data/resplit/line7.yaml", "--val", "0.5", "--seed", "1"))
    assert "train.json" in out and "val.json" in out
    train = json.loads((work / "data/resplit/annotations/train.json").read_text())
    val = json.loads((work / "data/resplit/annotations/val.json").read_text())
    names = lambda c: {im["file_name"] for im in c["images"]}  # noqa: E731
    assert not names(train) & names(val) and len(names(train) | names(val)) == 32
    assert 12 <= len(val["images"]) <= 20  # half, stratified by class
    present = lambda c: {a["category_id"] for a in c["annotations"]}  # noqa: E731
    assert present(train) == present(val)  # every class present on both sides
    all_ = json.loads((work / "data/line7/annotations/all.json").read_text())
    stats = ok(kit(work, "data", "stats", "data/line7/line7.yaml", "--out", "stats.png"))
    assert f"32 image(s), {len(all_['annotations'])} box(es)" in stats and "image sizes (w x h): 128x96 (32)" in stats
    for c in all_["categories"]:
        n = sum(a["category_id"] == c["id"] for a in all_["annotations"])
        assert any(line.split()[:2] == [c["name"], str(n)] for line in stats.splitlines()), (c["name"], n)
    assert (work / "stats.png").stat().st_size > 10_000
    refused(kit(work, "data", "stats", "data/nowhere.yaml"), "data", "nowhere.yaml")


# ---------------------------------------------------------------- train, resume, augment-preview, eval, export

def test_train_writes_a_run_with_metrics_curves_and_a_checkpoint(trained):
    out = ok(trained["first"])
    m = trained["after_first"]["metrics"]
    assert m["epochs_run"] == 1 and m["run"] == "first" and m["skipped_pretrained_tensors"] == []
    assert f"best mAP50-95 {m['val']['map50_95']:.3f}, mAP50 {m['val']['map50']:.3f}" in out
    assert trained["after_first"]["checkpoints"] == ["line7-first-e0001"]
    assert (trained["run"] / "training_curves.png").stat().st_size > 10_000


def test_train_resume_continues_the_run_from_its_checkpoint(trained):
    out = ok(trained["resumed"])
    run = trained["run"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs_run"] == 2 and [r["epoch"] for r in m["resumes"]] == [1]
    assert m["resumes"][0]["from_checkpoint"] == "line7-first-e0001"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert f"best mAP50-95 {m['val']['map50_95']:.3f}" in out
    assert (run / "checkpoints/line7-first-e0002").is_dir()


def test_train_refusals_name_the_fix(work, trained):
    ok(trained["resumed"])
    refused(kit(work, "train", "data/line7/line7.yaml", "--name", "typo", "--set", "epoch=3"), "train",
            "Did you mean 'epochs'")
    assert not (work / "runs/line7/typo").exists()
    refused(kit(work, "train", "--resume", "runs/line7/first"), "train", "already finished all 2 epochs",
            "--epochs N with N > 2")


def test_augment_preview_draws_a_grid(work, imported):
    import cv2

    ok(imported)
    out = ok(kit(work, "augment-preview", "data/line7/line7.yaml", "--out", "aug.png", "-n", "4", "--set", "mosaic=1.0"))
    assert "aug.png" in out
    img = cv2.imread(str(work / "aug.png"))
    assert img is not None and img.shape[0] >= 96 and img.shape[1] >= 2 * 96 and img.std() > 5


def test_eval_prints_and_writes_map(work, trained):
    ok(trained["resumed"])
    out = ok(kit(work, "eval", "data/line7/line7.yaml", "--run", "runs/line7/first"))
    result = json.loads((work / "runs/line7/first/eval/val/eval.json").read_text())
    assert f"mAP50-95 {result['map50_95']:.3f}   mAP50 {result['map50']:.3f}" in out
    assert f"({result['images']} images" in out and result["images"] == 8
    refused(kit(work, "eval", "--run", "runs/line7/nowhere"), "eval", "runs/line7/nowhere")


def test_export_writes_paddle_and_onnx_that_agree(work, exported):
    out = exported["proc"].stdout
    export = work / "runs/line7/first/export"
    deploy = json.loads((export / "deploy.json").read_text())
    files = {m["file"] for m in deploy["models"]}
    assert {"model.pdmodel", "model_nonms.pdmodel", "model.onnx", "model_nonms.onnx"} <= files
    assert all((export / f).stat().st_size > 100_000 for f in ("model.onnx", "model_nonms.onnx"))
    line = next(x for x in out.splitlines() if x.startswith("ONNX Runtime vs paddle.inference"))
    matched = int(line.split(" matched detections")[0].rsplit(" ", 1)[1])
    assert matched > 0 and "count mismatches 0" in line, line
    refused(kit(work, "export", "--run", "runs/line7/nowhere"), "export", "runs/line7/nowhere")


# ---------------------------------------------------------------- meanwhile (compress runs in the background)

def test_pretrain_writes_weights_with_their_provenance(work):
    from edge_runtime.modelspec import file_sha256

    out = ok(kit(work, "pretrain", "--name", "base-test", "--count", "12", "--epochs", "1", "--work", "pt/work",
                 "--out", "pt/out"))
    weights = work / "pt/out/base-test.pdparams"
    assert "base weights: pt/out/base-test.pdparams" in out
    record = json.loads((work / "pt/out/base-test.json").read_text())
    assert record["sha256"] == file_sha256(weights) and weights.stat().st_size > 1_000_000
    assert record["recipe"]["count"] == 12 and record["metrics"]["epochs_run"] == 1
    command = record["command"].split()  # the command that reproduces the recipe, every recipe flag spelled out
    assert command[:2] == ["defectkit", "pretrain"], record["command"]
    for flag, value in (("--corpus", "pcb"), ("--name", "base-test"), ("--count", "12"), ("--epochs", "1")):
        assert command[command.index(flag) + 1] == value, (flag, record["command"])
    refused(kit(work, "pretrain", "--name", "small", "--count", "8", "--epochs", "1", "--work", "pt/small",
                "--out", "pt/small-out"), "pretrain", "batch_size")
    assert not (work / "pt/small-out").exists()


def test_retrain_from_a_run_with_new_data_passes_its_gate(retrained):
    out = ok(retrained["first"])
    record = retrained["record_after_first"]
    assert record["status"] == "passed" and record["new_classes"] == []
    assert "forgetting gate PASSED" in out and "retrain.md" in out
    verdict = record["forgetting"]
    assert f"{verdict['old_map_parent']:.4f} -> {verdict['old_map_retrained']:.4f}" in out
    run = retrained["run"]
    assert (run / "retrain.png").stat().st_size > 10_000 and "AP50-95" in (run / "retrain.md").read_text()


def test_retrain_resume_continues_and_judges_again(retrained):
    out = ok(retrained["resumed"])
    run = retrained["run"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs_run"] == 2 and m["resumes"][0]["from_checkpoint"] == "line7-rt-e0001"
    record = json.loads((run / "retrain.json").read_text())
    assert record["status"] == "passed" and record["finished"] >= retrained["record_after_first"]["finished"]
    assert "forgetting gate PASSED" in out


def test_retrain_without_data_is_refused(work, trained):
    ok(trained["resumed"])
    refused(kit(work, "retrain", "--from", "runs/line7/first"), "retrain", "--add DATA_FOLDER")


def test_lineage_names_the_data_and_the_parent(work, retrained):
    ok(retrained["resumed"])
    out = ok(kit(work, "lineage", "runs/line7/rt"))
    assert "runs/line7/first" in out and "line7-week12" in out and "retrain (passed)" in out
    record = json.loads(ok(kit(work, "lineage", "runs/line7/rt", "--json")))
    text = json.dumps(record)
    assert "line7-week12" in text and "runs/line7/first" in text
    refused(kit(work, "lineage", "data/line7"), "lineage", "runs/<line>/<run>")


def test_migrate_run_makes_a_legacy_run_usable_again(work, trained):
    """A run as the kit wrote it before settings.yaml: line.yaml (the spec) and config.yaml (train, ppdet)."""
    ok(trained["resumed"])
    legacy = work / "runs/line7/legacy"
    shutil.copytree(work / "runs/line7/first", legacy,
                    ignore=shutil.ignore_patterns("compress", "export", "checkpoints", "eval", "vdl", "settings.yaml"))
    spec = yaml.safe_load((work / "data/line7/line7.yaml").read_text())
    spec["paths"]["root"] = str(work / "data/line7")
    spec["train"]["pretrained"] = str(ROOT / "base_weights/pcb-base-tiny-320.pdparams")
    (legacy / "line.yaml").write_text(yaml.safe_dump(spec))
    (legacy / "config.yaml").write_text(yaml.safe_dump({
        "line": "line7", "device": "cpu", "ppdet": {"epoch": 2},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.005, "warmup_steps": 2, "multiscale": False}}))
    refused(kit(work, "eval", "--run", "runs/line7/legacy"), "eval", "defectkit migrate-run")
    out = ok(kit(work, "migrate-run", "runs/line7/legacy"))
    assert "settings.yaml" in out and "line line7, 6 classes, train.lr 0.005" in out
    settings = yaml.safe_load((legacy / "settings.yaml").read_text())
    assert settings["settings"]["train"]["lr"] == 0.005 and settings["settings"]["train"]["epochs"] == 2
    got = ok(kit(work, "eval", "--run", "runs/line7/legacy"))  # the same weights on the same val set
    legacy_eval = json.loads((legacy / "eval/val/eval.json").read_text())
    first = json.loads((work / "runs/line7/first/metrics.json").read_text())["val"]  # best weights on val
    assert f"mAP50-95 {legacy_eval['map50_95']:.3f}" in got
    assert legacy_eval["map50_95"] == pytest.approx(first["map50_95"], abs=1e-6)
    assert legacy_eval["detections"] == first["detections"]
    refused(kit(work, "migrate-run", "runs/line7/legacy"), "migrate-run", "already has settings.yaml")


def test_keys_init_writes_a_private_and_public_key_and_never_overwrites(work, keys):
    out = ok(keys)
    private, public = work / "keys/bundle_signing_key.pem", work / "keys/bundle_signing_key.pub.pem"
    assert (private.stat().st_mode & 0o777) == 0o600 and b"PRIVATE KEY" in private.read_bytes()
    assert b"PUBLIC KEY" in public.read_bytes() and "key id" in out
    before = private.read_bytes()
    refused(kit(work, "keys", "init", "--dir", "keys/"), "keys", "refusing to overwrite", "another --dir")
    assert private.read_bytes() == before


@pytest.mark.parametrize("verb", ["demo", "fleet-demo"])
def test_demo_verbs_have_help(work, verb):
    """Not run in full here (13 and ~2 minutes): test_demo.py / test_fleet_demo.py run their chains."""
    out = ok(kit(work, verb, "--help"))
    assert f"usage: defectkit {verb}" in out and "--out" in out


# ---------------------------------------------------------------- compress (defaults; no edge box), bundles

def test_compress_ptq_with_defaults_skips_lite_with_one_warning_and_keeps_everything(work, compressed):
    out = ok(compressed)
    warnings = [x for x in out.splitlines() if "Paddle Lite" in x]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: Paddle Lite step skipped (") and \
        warnings[0].endswith("every other result is kept") and "empty_cache" in warnings[0]
    comp = work / "runs/line7/first/compress"
    variants = {}
    for name in ("fp32", "ort-int8", "ort-int8-fast", "ptq-int8"):  # compress.ort_recipes: default and fast
        variants[name] = json.loads((comp / name / "variant.json").read_text())
    assert variants["ort-int8-fast"]["recipe"]["ops"] != variants["ort-int8"]["recipe"]["ops"] == ["Conv"]
    for name in ("ort-int8", "ort-int8-fast", "ptq-int8"):
        gate = variants[name]["gate"]
        verdict = "PASSED" if gate["passed"] else "REFUSED"
        assert any(x.startswith(f"gate {verdict} for {name}:") for x in out.splitlines()), out[-3000:]
        assert "lite" not in variants[name]["recipe"]  # skipped before it began, not failed half-way
    assert not list(comp.rglob("*.nb"))
    for suffix in ("md", "csv", "png"):
        assert (comp / f"table.{suffix}").stat().st_size > 200
    rows = {r["variant"]: r for r in csv.DictReader((comp / "table.csv").open())}
    assert {"fp32", "ort-int8", "ort-int8-fast", "ptq-int8"} <= set(rows)
    table = (comp / "table.md").read_text()
    assert "| ort-int8 | ptq |" in table and table in out


def test_compress_of_a_missing_run_is_refused(work):
    refused(kit(work, "compress", "--method", "ptq", "runs/line7/nowhere"), "compress", "runs/line7/nowhere")


def test_bundle_from_a_run_then_verify_and_tamper(work, bundled):
    out = ok(bundled)
    assert "bundles/line7/1.0.0" in out and (work / "bundles/line7/1.0.0.tar.gz").stat().st_size > 100_000
    manifest = json.loads((work / "bundles/line7/1.0.0/manifest.json").read_text())
    assert manifest["version"] == "1.0.0" and manifest["line"] == "line7"
    assert len(list((work / "bundles/line7/1.0.0/golden").glob("*.expected.json"))) > 0
    ver = ok(kit(work, "bundle", "verify", "bundles/line7/1.0.0.tar.gz", "--public-key",
                 "keys/bundle_signing_key.pub.pem"))
    assert ver.startswith("OK: bundle line7 1.0.0") and "no unlisted files" in ver
    shutil.copytree(work / "bundles/line7/1.0.0", work / "tampered")
    with (work / "tampered/drift_reference.json").open("a") as f:
        f.write(" ")
    refused(kit(work, "bundle", "verify", "tampered", "--public-key", "keys/bundle_signing_key.pub.pem"), "bundle",
            "drift_reference.json", "tampered", code=4)
    refused(kit(work, "bundle", "verify", "bundles/line7/9.9.9.tar.gz", "--public-key",
                "keys/bundle_signing_key.pub.pem"), "bundle", "bundles/line7/9.9.9.tar.gz does not exist")
    refused(kit(work, "bundle", "runs/line7/first", "--variant", "nosuch", "--key", "keys/bundle_signing_key.pem"),
            "bundle", "no variant 'nosuch'", "defectkit compress")


def test_bundle_build_from_explicit_files_verifies(work, bundled):
    ok(bundled)
    out = ok(kit(work, "bundle", "build", "--out", "store", "--version", "0.1.0", "--deploy", "runs/line7/first/export",
                 "--key", "keys/bundle_signing_key.pem", "--drift-reference", "bundles/line7/1.0.0/drift_reference.json",
                 "--run", "runs/line7/first"))
    assert "store/line7/0.1.0.tar.gz" in out
    ver = ok(kit(work, "bundle", "verify", "store/line7/0.1.0.tar.gz", "--public-key", "keys/bundle_signing_key.pub.pem"))
    assert ver.startswith("OK: bundle line7 0.1.0")
    refused(kit(work, "bundle", "build", "--out", "store", "--version", "0.2.0", "--deploy", "runs/line7/first/export",
                "--key", "keys/bundle_signing_key.pem", "--drift-reference", "bundles/line7/1.0.0/drift_reference.json",
                "--golden", "just-an-image.jpg"), "bundle", "IMAGE=EXPECTED.json")


def test_predict_runs_the_edge_runtime_over_a_folder(work, bundled):
    ok(bundled)
    out = ok(kit(work, "predict", "--bundle", "bundles/line7/1.0.0.tar.gz", "--public-key",
                 "keys/bundle_signing_key.pub.pem", "--source", "data/line7/images", "--out", "preds.jsonl",
                 "--save-annotated", "annotated"))
    rows = [json.loads(x) for x in (work / "preds.jsonl").read_text().splitlines()]
    ng = sum(r["verdict"] == "NG" for r in rows)
    assert len(rows) == 32 and all(r["verdict"] in ("OK", "NG") for r in rows)
    assert f"32 images: {ng} NG, {32 - ng} OK" in out and "onnxruntime" in out
    assert len(list((work / "annotated").glob("*.png"))) == 32
    refused(kit(work, "predict", "--bundle", "bundles/line7/1.0.0.tar.gz", "--source", "data/line7/images"),
            "predict", "--public-key")


# ---------------------------------------------------------------- the collector and the box

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    """Wait until the collector answers (the timeout only ends a broken start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"collector at {url} never answered")


@pytest.fixture(scope="module")
def collector(work, bundled):
    ok(bundled)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "defectkit", "collector", "serve", "--db", "fleet.db", "--port",
                             str(port)], cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        health = _until_healthy(url, proc)
        # the box: the README's command on the tiny line, every frame in the hard-example band so some are sent
        (work / "token.txt").write_text("dev-token\n")
        (work / "band.json").write_text(json.dumps({"report": {"hard_example_low": 0.0, "hard_example_high": 1.0}}))
        box = subprocess.run([sys.executable, "-m", "edge_runtime", "run", "--bundle", "bundles/line7/1.0.0.tar.gz",
                              "--public-key", "keys/bundle_signing_key.pub.pem", "--source", "data/line7/images",
                              "--device-id", "line7-box1", "--collector", url, "--token-file", "token.txt",
                              "--max-frames", "32", "--metrics-port", "-1", "--out", "edge_out",
                              "--settings-override", "band.json"],
                             cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
        yield {"url": url, "health": health, "box": box, "proc": proc}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def test_collector_serve_takes_the_boxs_reports_and_list_shows_them(work, collector):
    assert collector["health"]["status"] == "ok" and collector["health"]["reports"] == 0
    box_out = ok(collector["box"])
    assert "32 frames:" in box_out and "max frames (32) reached" in box_out
    reports = [json.loads(x) for x in ok(kit(work, "collector", "list", "--db", "fleet.db", "--json")).splitlines()]
    assert reports and all(r["device_id"] == "line7-box1" and r["line"] == "line7" for r in reports)
    assert sum(r["counts"]["frames"] for r in reports) == 32  # every frame reported once
    ng = sum(r["counts"]["ng"] for r in reports)
    assert f"32 frames: {ng} NG, {32 - ng} OK" in box_out
    table = ok(kit(work, "collector", "list", "--db", "fleet.db"))
    assert "line7-box1" in table and f"{len(reports)} shown of {len(reports)} reports" in table
    hard = ok(kit(work, "collector", "list", "--db", "fleet.db", "--what", "hard-examples"))
    assert "line7-box1" in hard and " hard-examples" in hard


def test_collector_export_hard_examples_writes_a_prelabelled_data_folder(work, collector):
    ok(collector["box"])
    listed = [json.loads(x) for x in ok(kit(work, "collector", "list", "--db", "fleet.db", "--what", "hard-examples",
                                            "--json", "--limit", "1000")).splitlines()]
    assert listed
    out = ok(kit(work, "collector", "export-hard-examples", "--db", "fleet.db", "--line", "line7", "--out",
                 "data/line7-hard", "--classes", CLASSES))
    coco = json.loads((work / "data/line7-hard/annotations/all.json").read_text())
    assert coco["info"]["reviewed"] is False and len(coco["images"]) == len(listed)
    assert f"{len(listed)} hard examples, {len(coco['annotations'])} pre-labelled boxes" in out
    assert all((work / "data/line7-hard/images" / im["file_name"]).is_file() for im in coco["images"])
    assert [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])][:6] == CLASSES.split(",")
    refused(kit(work, "collector", "export-hard-examples", "--db", "fleet.db", "--line", "line7", "--out",
                "data/line7-hard"), "collector", "never overwrites labelling work")


def test_collector_serve_stops_cleanly(collector):
    proc = collector["proc"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "collector listening on http://127.0.0.1:" in out + err


# ---------------------------------------------------------------- registry / fleet / rollout (test_fleet_*.py cover them)

def test_registry_fleet_rollout_smoke(work, bundled):
    ok(bundled)
    for verb in ("registry", "fleet", "rollout"):
        assert f"usage: defectkit {verb}" in ok(kit(work, verb, "--help"))
    out = ok(kit(work, "registry", "push", "bundles/line7/1.0.0.tar.gz", "--db", "reg.db", "--public-key",
                 "keys/bundle_signing_key.pub.pem"))
    assert "line7 1.0.0: registered as candidate" in out
    listed = ok(kit(work, "registry", "list", "line7", "--db", "reg.db"))
    assert any(x.split()[:2] == ["1.0.0", "candidate"] for x in listed.splitlines()), listed
    enrolled = ok(kit(work, "fleet", "enroll", "--line", "line7", "--device", "box1", "--db", "reg.db"))
    assert "box1" in enrolled
    devices = ok(kit(work, "fleet", "list", "--db", "reg.db"))
    assert any(x.split()[:2] == ["box1", "line7"] for x in devices.splitlines()) and "1 device(s)" in devices
    refused(kit(work, "rollout", "status", "line7", "--db", "reg.db"), "rollout", "never had a rollout",
            "defectkit rollout start")
