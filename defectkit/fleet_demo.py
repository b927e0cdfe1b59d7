"""``defectkit fleet-demo``: the fleet's whole loop on synthetic lines, with real processes (issue 10 item 7).

1. a synthetic PCB line (green boards) and a shifted one (other solder-mask colours) — ``detect.data.synth``;
2. v1 = the kit's base detector as the line's first run, exported, measured, bundled and signed;
3. the collector (registry, targets key, rollout evaluator) and N boxes (``python -m edge_runtime run``, ONNX
   Runtime, watched folders) enrolled on the line, all running v1 on in-distribution boards;
4. the line shifts: the boxes raise a drift alarm and send hard examples; the collector exports them
   (``collector export-hard-examples``); the synthetic GROUND TRUTH STANDS IN FOR THE LABELLER here;
5. ``defectkit retrain`` on them behind its forgetting gate; the retrained model is bundled as v2, pushed,
   canaried on one box and promoted by the evaluator; every box runs v2;
6. a bad v3 (its golden expectations do not match its model: a broken export) is canaried and rolled back.

Every step prints a timeline line with the figures behind its decision; ``<out>/timeline.json`` keeps them.
Waits are on conditions (reports in the store, state files, the rollout state), each with a generous bound.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from edge_runtime.errors import DefectkitError, UserInputError

LINE = "pcb-fleet"


def register(subparsers) -> None:
    p = subparsers.add_parser("fleet-demo", help="the fleet loop on synthetic lines: drift, hard examples, retrain, "
                                                  "canary, promotion, rollback (a few minutes)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("fleet_demo_out"), help="work folder (default ./fleet_demo_out)")
    p.add_argument("--boxes", type=int, default=2, help="edge boxes on the line (default %(default)s)")
    p.add_argument("--count", type=int, default=40, help="boards of the line's own data set (default %(default)s)")
    p.add_argument("--shifted", type=int, default=60, help="boards of the shifted line fed to the boxes "
                                                           "(default %(default)s)")
    p.add_argument("--hard", type=int, default=12, help="hard examples to wait for before the retrain "
                                                       "(default %(default)s)")
    p.add_argument("--epochs", type=int, default=1, help="retrain epochs (default %(default)s)")
    p.add_argument("--window", default="15s", help="canary window (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic lines (default %(default)s)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    result = run_fleet_demo(args.out, boxes=args.boxes, count=args.count, shifted=args.shifted, hard=args.hard,
                            epochs=args.epochs, window=args.window, seed=args.seed)
    print(f"timeline: {result['timeline_path']}")
    return 0


class Timeline:
    def __init__(self, path: Path) -> None:
        self.t0, self.path, self.rows = time.time(), path, []

    def mark(self, event: str, **figures: Any) -> None:
        row = {"t_s": round(time.time() - self.t0, 1), "event": event, **figures}
        self.rows.append(row)
        figs = "; ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
        print(f"[{row['t_s']:7.1f} s] {event}" + (f"  ({figs})" if figs else ""), flush=True)
        self.path.write_text(json.dumps(self.rows, indent=1))


def _fmt(v: Any) -> str:
    if isinstance(v, float) and abs(v) < 1e-3 and v != 0:
        return f"{v:.1e}"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def wait_for(cond: Callable, what: str, timeout: float = 600.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise UserInputError(f"fleet demo: timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def _defectkit(*args: Any, log: Optional[Path] = None) -> str:
    """A ``defectkit`` verb in a subprocess (what an engineer types); its output is kept in ``log``."""
    cmd = [sys.executable, "-m", "defectkit", *[str(a) for a in args]]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ defectkit {' '.join(map(str, args))}\n{res.stdout}\n{res.stderr}")
    if res.returncode != 0:
        raise UserInputError(f"fleet demo: 'defectkit {' '.join(map(str, args[:3]))} ...' exited {res.returncode}: "
                             f"{(res.stderr or res.stdout).strip()[-800:]}")
    return res.stdout


def _base_run(root: Path, spec) -> Path:
    """The kit's base detector as the line's first run (no training): weights + the run's settings record."""
    from detect.ppyoloe import RunPaths
    from detect.run_settings import write_run_settings

    run = RunPaths(root)
    if not run.best_weights.is_file():
        run.best_weights.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).resolve().parents[1] / "base_weights" / "pcb-base-tiny-320.pdparams",
                        run.best_weights)
        write_run_settings(run.root, spec)
        run.metrics.write_text(json.dumps({"classes": list(spec.classes), "source": "kit base weights, not trained"}))
    return run.root


def _bundle(run_dir: Path, store: Path, key: Path, version: str, parent: Optional[str]) -> tuple[Path, dict]:
    """Export + measure the run's FP32 model, choose its golden images, sign a bundle (``defectkit bundle``)."""
    from compress.bundle_from_run import bundle_from_run
    from compress.pipeline import ensure_parent, golden_images, load_run

    spec, run = load_run(run_dir)
    fp32 = ensure_parent(spec, run, threads=[1], progress=False)
    golden_images(spec, run, fp32, 4)
    out = store / spec.line / version
    if not out.is_dir():
        out = bundle_from_run(run_dir, ["fp32"], store, key, version=version, parent_version=parent, progress=False)
    return out, {"map50": fp32.map50, "map50_95": fp32.map50_95}


def _archive(bundle_dir: Path) -> Path:
    return bundle_dir.parent / f"{bundle_dir.name}.tar.gz"


def _broken_copy(src: Path, version: str, key: Path) -> Path:
    """``src`` as ``version`` with golden expectations of no detection (a broken export), signed again."""
    import hashlib
    import tarfile

    from compress.keys import load_private_key
    from edge_runtime.bundle import MANIFEST, SIGNATURE, signature_document

    dest = src.parent / version
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest.update(version=version, parent_version=src.name)
    body = json.dumps({"schema": "defectkit.golden/1", "detections": []}).encode()
    for g in manifest["golden"]:
        (dest / g["expected"]["file"]).write_bytes(body)
        g["expected"]["sha256"] = hashlib.sha256(body).hexdigest()
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    k = load_private_key(key)
    (dest / MANIFEST).write_bytes(data)
    (dest / SIGNATURE).write_bytes(signature_document(data, k.sign(data), k.public_key()))
    with tarfile.open(_archive(dest), "w:gz") as tar:
        for path in sorted(dest.rglob("*")):
            tar.add(str(path), arcname=path.relative_to(dest).as_posix(), recursive=False)
    return dest


class Box:
    """``python -m edge_runtime run`` on a watched folder, reporting to the collector."""

    def __init__(self, work: Path, device: str, bundle: Path, public_key: Path, url: str, token: str,
                 targets_key: Path, override: Path) -> None:
        self.device, self.dir = device, work / device
        self.source, self.state = self.dir / "camera", self.dir / "out" / "state" / "state.json"
        self.source.mkdir(parents=True, exist_ok=True)
        (self.dir / "token").write_text(token + "\n")
        (self.dir / "token").chmod(0o600)
        self.log = open(self.dir / "box.log", "wb")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime", "run", "--bundle", str(bundle), "--public-key", str(public_key),
             "--source", str(self.source), "--watch", "--watch-after", "delete", "--device-id", device,
             "--out", str(self.dir / "out"), "--backend", "onnxruntime", "--threads", "1", "--metrics-port", "-1",
             "--collector", url, "--token-file", str(self.dir / "token"), "--targets-public-key", str(targets_key),
             "--report-interval", "2", "--update-poll", "1", "--settings-override", str(override), "--no-ng-images"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def current(self) -> Optional[str]:
        if self.p.poll() is not None:
            raise UserInputError(f"fleet demo: box {self.device} exited {self.p.returncode}; see {self.dir}/box.log")
        try:
            return json.loads(self.state.read_text()).get("current")
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.log.close()


class Feeder:
    """A camera per box: copies the current pool's images into each watched folder, ``fps`` per box, cycling (a
    copy is named ``<n>-<original name>`` so the labeller step finds its ground truth)."""

    def __init__(self, boxes, fps: float = 3.0) -> None:
        import threading

        self.boxes, self.period, self.pool, self.n = list(boxes), 1.0 / fps, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            pool = self.pool
            if not pool:
                continue
            img = pool[self.n % len(pool)]
            for b in self.boxes:
                if b.p.poll() is None and len(os.listdir(b.source)) < 10:  # a busy box is not flooded
                    tmp = b.source / f".{self.n:06d}-{img.name}.part"
                    shutil.copyfile(img, tmp)
                    os.replace(tmp, b.source / f"{self.n:06d}-{img.name}")
            self.n += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def run_fleet_demo(out: Path, *, boxes: int = 2, count: int = 40, shifted: int = 60, hard: int = 12,
                   epochs: int = 1, window: str = "15s", seed: int = 0) -> dict:
    from compress.keys import PRIVATE_NAME, PUBLIC_NAME, init_keys
    from detect.data.synth import generate_line
    from fleet import devices, registry, rollout, store
    from fleet.server import CollectorThread
    from fleet.settings import CollectorSettings

    out = Path(out).resolve()
    if out.exists():
        raise UserInputError(f"{out} exists: the fleet demo starts from an empty folder; remove it or give --out")
    out.mkdir(parents=True)
    tl = Timeline(out / "timeline.json")
    db = out / "fleet" / "fleet.db"

    # 1. lines
    spec = generate_line(out / "data" / LINE, line=LINE, count=count, seed=seed, val_fraction=0.25, progress=False)
    generate_line(out / "data" / "feed-ok", line="feed-ok", count=12, seed=seed + 1, progress=False)
    generate_line(out / "data" / "feed-shifted", line="feed-shifted", count=shifted, seed=seed + 2,
                          style="varied", progress=False)
    tl.mark("synthetic lines made", line_boards=count, in_distribution_feed=12, shifted_feed=shifted,
            shift="solder mask: green -> varied colours")

    # 2. v1: the base detector, bundled
    for d in ("bundle", "targets"):
        init_keys(out / "keys" / d)
    bkey, bpub = out / "keys" / "bundle" / PRIVATE_NAME, out / "keys" / "bundle" / PUBLIC_NAME
    tkey, tpub = out / "keys" / "targets" / PRIVATE_NAME, out / "keys" / "targets" / PUBLIC_NAME
    v1_run = _base_run(out / "runs" / LINE / "v1", spec)
    v1, v1_fig = _bundle(v1_run, out / "bundles", bkey, "1.0.0", None)
    tl.mark("v1 bundled (base detector, FP32 ONNX)", **{f"val_{k}": v for k, v in v1_fig.items()})

    # 3. fleet: registry, enrolment, collector, boxes
    _defectkit("registry", "push", _archive(v1), "--db", db, "--public-key", bpub, log=out / "logs" / "push-v1.txt")
    _defectkit("registry", "promote", LINE, "1.0.0", "--db", db, log=out / "logs" / "promote-v1.txt")
    names = [f"box-{i + 1}" for i in range(boxes)]
    tokens = {}
    for n in names:
        text = _defectkit("fleet", "enroll", "--line", LINE, "--device", n, "--db", db,
                          log=out / "logs" / f"enroll-{n}.txt")
        tokens[n] = text.strip().split()[-1]
    admin = os.urandom(16).hex()
    (out / "fleet" / "tokens.json").write_text(json.dumps({"admin": admin, "devices": {}}))
    collector = CollectorThread(CollectorSettings(db=db, port=0, tokens_file=out / "fleet" / "tokens.json",
                                                  targets_key=tkey, target_expiry_s=3600, rollout_interval_s=1.0)).start()
    # a small drift window so the demo alarms within a minute; hard examples not rate-limited for the demo
    override = out / "box_override.json"
    override.write_text(json.dumps({"drift": {"window": 40, "min_frames": 30, "eval_every": 5},
                                    "report": {"hard_examples_per_hour": 10000}}))
    running = [Box(out / "boxes", n, _archive(v1), bpub, collector.url, tokens[n], tpub, override) for n in names]
    result: dict = {"timeline_path": str(out / "timeline.json")}
    feeder = None
    try:
        wait_for(lambda: all(b.current() == "1.0.0" for b in running), "the boxes on 1.0.0", 300)

        def reports(**kw):
            with store.session(path=db) as conn:
                return store.list_reports(conn, line=LINE, limit=5000, **kw)

        feeder = Feeder(running)
        ok_images = sorted((out / "data" / "feed-ok" / "images").glob("*"))
        feeder.pool = ok_images
        wait_for(lambda: all(sum(r["counts"]["frames"] for r in reports(device=b.device)) >= 2 * len(ok_images)
                             for b in running), "the in-distribution boards reported", 600)
        ok_reps = reports()
        tl.mark("boxes on v1, line in distribution", boxes=boxes, frames=sum(r["counts"]["frames"] for r in ok_reps),
                ng_rate=_ng_rate(ok_reps), alarms=sum(r["drift"]["state"] == "alarm" for r in ok_reps))

        # 4. the line shifts
        shifted_images = sorted((out / "data" / "feed-shifted" / "images").glob("*"))
        feeder.pool = shifted_images
        alarm = wait_for(lambda: [r for r in reports() if r["drift"]["state"] == "alarm"], "a drift alarm", 900)[0]
        why = {k: f"psi {_fmt(v.get('psi'))}, KS p_adj {_fmt(v.get('p_adj'))}, mean {_fmt(v.get('ref_mean'))} -> "
                  f"{_fmt(v.get('window_mean'))}" for k, v in alarm["drift"]["features"].items()
               if v.get("state") == "alarm"}
        tl.mark("DRIFT ALARM", device=alarm["device_id"], bundle=alarm["bundle_version"], alarmed=why)

        def hard_rows():
            with store.session(path=db) as conn:
                return store.list_hard_examples(conn, line=LINE, limit=10000)

        wait_for(lambda: len(hard_rows()) >= hard, f"{hard} hard examples at the collector", 900)
        hard_dir = out / "data" / "hard"
        _defectkit("collector", "export-hard-examples", "--db", db, "--line", LINE, "--out", hard_dir,
                   "--classes", ",".join(spec.classes), log=out / "logs" / "export-hard-examples.txt")
        labelled = _label_from_ground_truth(hard_dir, hard_rows(), [out / "data" / "feed-ok", out / "data" / "feed-shifted"],
                                            spec.classes)
        tl.mark("hard examples exported; SYNTHETIC GROUND TRUTH STANDS IN FOR THE LABELLER", **labelled)

        # 5. retrain behind its gate, bundle v2, push, canary, promote
        _defectkit("retrain", "--from", v1_run, "--add", hard_dir, "--name", "v2", "--epochs", epochs,
                   log=out / "logs" / "retrain.txt")
        v2_run = v1_run.parent / "v2"
        gate = _retrain_figures(v2_run)
        tl.mark("retrain passed its forgetting gate", **gate)
        v2, v2_fig = _bundle(v2_run, out / "bundles", bkey, "2.0.0", "1.0.0")
        result["v2"] = _rollout(tl, db, v2, "2.0.0", names[0], window, running, out, expect="promoted")
        wait_for(lambda: all(b.current() == "2.0.0" for b in running), "every box on 2.0.0", 600)
        tl.mark("every box runs v2", boxes=boxes)

        # 6. a bad version: canaried and rolled back
        v3 = _broken_copy(v2, "3.0.0", bkey)
        result["v3"] = _rollout(tl, db, v3, "3.0.0", names[-1], window, running, out, expect="rolled_back")
        with store.session(path=db) as conn:
            active = registry.active_version(conn, line=LINE)["version"]
        tl.mark("after the rollback", active=active, boxes_on={b.device: b.current() for b in running})
        if active != "2.0.0" or any(b.current() != "2.0.0" for b in running):
            raise DefectkitError("fleet demo: after the rollback the line should run 2.0.0 everywhere")
    finally:
        if feeder is not None:
            feeder.stop()
        for b in running:
            b.stop()
        collector.stop()
    result["timeline"] = tl.rows
    return result


def _ng_rate(reps) -> Optional[float]:
    frames = sum(r["counts"]["frames"] for r in reps)
    return sum(r["counts"]["ng"] for r in reps) / frames if frames else None


def _label_from_ground_truth(hard_dir: Path, rows: list, truth_dirs: list, classes) -> dict:
    """Replace the model's pre-labels with the synthetic line's ground truth (what a labeller would draw) and mark
    the file reviewed. The box sent each hard example with its source file name: that finds its true boxes."""
    from edge_runtime.fileio import atomic_write_json

    ann_path = hard_dir / "annotations" / "all.json"
    coco = json.loads(ann_path.read_text())
    truth = [json.loads((d / "annotations" / "all.json").read_text()) for d in truth_dirs]
    t_images = {im["file_name"]: (t, im) for t in truth for im in t["images"]}
    cat = {c["name"]: c["id"] for c in coco["categories"]}
    source = {r["id"]: Path(r.get("source") or "").name.split("-", 1)[-1] for r in rows}  # the feeder's n- prefix
    anns, pre = [], len(coco["annotations"])
    for im in coco["images"]:
        found = t_images.get(source.get(Path(im["file_name"]).stem, ""))
        if found is None:
            raise DefectkitError(f"fleet demo: hard example {im['file_name']} (source "
                                 f"{source.get(Path(im['file_name']).stem)}) has no synthetic ground truth")
        t, t_im = found
        t_cat = {c["id"]: c["name"] for c in t["categories"]}
        for a in t["annotations"]:
            if a["image_id"] == t_im["id"]:
                anns.append({**a, "id": len(anns) + 1, "image_id": im["id"], "category_id": cat[t_cat[a["category_id"]]]})
    coco["annotations"] = anns
    coco["info"].update(reviewed=True, description="synthetic ground truth (stands in for a labeller)",
                        note="labels replaced by the fleet demo from the synthetic line's ground truth")
    atomic_write_json(ann_path, coco, indent=None)
    return {"images": len(coco["images"]), "model_pre_labels": pre, "true_boxes": len(anns)}


def _retrain_figures(run: Path) -> dict:
    rec = json.loads((run / "retrain.json").read_text())
    g = rec["forgetting"]
    worst = max((c for c in g["classes"] if c["drop_points"] is not None), key=lambda c: c["drop_points"],
                default=None)
    return {"status": rec["status"], "old_map50_95": f"{g['old_map_parent']:.4f} -> {g['old_map_retrained']:.4f}",
            "drop_points": g["drop_points"], "max_map_drop": g["max_map_drop"],
            "worst_class": worst and f"{worst['name']} {worst['drop_points']:+.2f} pt (limit {g['max_class_drop']})"}


def _rollout(tl: Timeline, db: Path, bundle: Path, version: str, canary: str, window: str, running, out: Path,
             expect: str) -> dict:
    from fleet import rollout, store

    t0 = time.time()
    _defectkit("registry", "push", _archive(bundle), "--db", db, log=out / "logs" / f"push-{version}.txt")
    _defectkit("rollout", "start", LINE, version, "--devices", canary, "--window", window, "--db", db,
               log=out / "logs" / f"rollout-{version}.txt")
    tl.mark(f"v{version} pushed, canary started", canary=canary, window=window)
    box = next(b for b in running if b.device == canary)
    if expect == "promoted":
        wait_for(lambda: box.current() == version, f"{canary} running {version}", 600)
        tl.mark(f"canary {canary} runs {version}", seconds_from_push=round(time.time() - t0, 1))

    def done():
        with store.session(path=db) as conn:
            r = rollout.latest(conn, line=LINE)
            return r if r["version"] == version and r["state"] != "running" else None

    r = wait_for(done, f"the rollout decision on {version}", 900)
    with store.session(path=db) as conn:
        d = rollout.decisions(conn, rollout_id=r["id"])[-1]
    f = d["figures"]
    figures = {k: f.get(k) for k in ("canary_frames", "canary_ng_rate", "baseline_frames", "baseline_ng_rate",
                                      "ng_band", "canary_alarm_share", "baseline_alarm_share") if k in f}
    tl.mark(f"rollout {r['state'].upper()}: {r['reason'][:160]}", seconds_from_push=round(d["at"] - t0, 1), **figures)
    status = _defectkit("rollout", "status", LINE, "--db", db, log=out / "logs" / f"status-{version}.txt")
    if r["state"] != expect:
        raise DefectkitError(f"fleet demo: the rollout of {version} ended {r['state']}, expected {expect}:\n{status}")
    return {"state": r["state"], "reason": r["reason"], "figures": figures}


__all__ = ["run_fleet_demo", "register"]
