"""Where a training step's time goes, and images per CPU-second of the kit's training: one command.

    python bench/train_profile.py                # arms before,defaults, 3 epochs each, profile + ratio (~3 CPU-min)
    python bench/train_profile.py --arms before,defaults,eval-every-1,mkl-off --epochs 5   # docs/benchmarks.md
    python bench/train_profile.py --arms defaults,workers-1,batch-16,onednn --rounds 2    # arms alternated

The line is one the shipped base never saw (``bench/first_model.py``'s ``make_line``: ``detect.data.foreign`` boards,
150 images split 70/30). Each arm fine-tunes ``base_weights/pcb-base-tiny-320`` (tiny, 320 px) for ``--epochs`` epochs
in its own process at one thread (``OMP_NUM_THREADS=1``), through the kit's real session (``detect.session``:
ppdet's Trainer, the seeded loader, the callbacks, checkpoints, the final evaluation of the best weights). The
profile is taken by thin timing wrappers put around ppdet's own pieces (each sample and batch transform operator,
the collate, the model's forward and its head's loss, ``Tensor.backward``, the optimizer, the EMA, the checkpoint
writer, the in-loop evaluation and its COCO metric): per phase the CPU seconds of the thread that ran it
(``time.thread_time``, exclusive of nested phases) and its wall seconds. ppdet's loader runs in a background
thread even with ``workers: 0``, so loading overlaps compute in wall time but not in CPU time on one core.

Per arm: training images per CPU-second of the arm's process tree (process + reaped children: loader workers use
another core) and per wall-second, evaluation included. Arms differ from the defaults only by their overrides
(``ARMS``); with ``--rounds`` > 1 they alternate so a change of machine load hits all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import zlib  # noqa: E402,F401  -- before paddle (import-order segfault, STACK.md)

BASE = HERE.parent / "base_weights" / "pcb-base-tiny-320.pdparams"
# what every arm trains with (the bench's fixed frame); the arms change only what their name says
FRAME = {"time_budget_min": 0.0, "visualdl": False, "keep_last": 1, "keep_weekly": False, "patience": 0}
ARMS: dict[str, dict] = {
    "before": {"eval_interval": 1, "mkl_avx2_on_amd": False},  # the defaults before issue 11 item 5
    "defaults": {},
    "eval-every-1": {"eval_interval": 1},
    "mkl-off": {"mkl_avx2_on_amd": False},
    "workers-1": {"workers": 1},
    "onednn": {"_flags": {"FLAGS_use_mkldnn": True}},
    "batch-16": {"batch_size": 16},
}


class PhaseClock:
    """Exclusive CPU (per thread) and wall seconds of named phases; phases may nest (children are subtracted)."""

    def __init__(self):
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.thread_of: dict[str, str] = {}
        self.local = threading.local()
        self.lock = threading.Lock()

    def wrap(self, name, fn):
        """``fn`` timed as phase ``name`` (a callable: ``name(*args)`` picks the phase per call)."""
        clock = self

        def timed(*args, **kwargs):
            phase = name(*args) if callable(name) else name
            stack = clock.local.__dict__.setdefault("stack", [])
            stack.append([0.0, 0.0])
            c0, w0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dc, dw = time.thread_time() - c0, time.perf_counter() - w0
                child_c, child_w = stack.pop()
                if stack:
                    stack[-1][0] += dc
                    stack[-1][1] += dw
                with clock.lock:
                    clock.cpu[phase] += dc - child_c
                    clock.wall[phase] += dw - child_w
                    clock.calls[phase] += 1
                    clock.thread_of[phase] = threading.current_thread().name

        timed.__wrapped__ = fn
        return timed


class TimedOp:
    """A ppdet transform operator whose calls are timed (Compose/BatchCompose call ``op(data)``)."""

    def __init__(self, op, clock: PhaseClock, phase: str):
        self.op = op
        self.call = clock.wrap(phase, op.__call__)

    def __call__(self, data):
        return self.call(data)

    def __getattr__(self, key):
        return getattr(self.op, key)


def instrument(session, clock: PhaseClock) -> None:
    """Put the timing wrappers around ppdet's and the kit's pieces of one session (this process only)."""
    import detect.seeded_loader as sl
    import detect.session as ses
    from detect.heavy import paddle_stack
    from ppdet.data.source.dataset import DetDataset

    paddle = paddle_stack().paddle
    trainer = session.trainer
    train_ds = session.loader.dataset
    compose = train_ds.transform
    compose.transforms_cls = [TimedOp(op, clock, "data: decode" if type(op).__name__ == "Decode"
                                      else f"augment: {type(op).__name__}") for op in compose.transforms_cls]
    batch = session.loader.batch_transforms
    batch.transforms_cls = [TimedOp(op, clock, f"batch: {type(op).__name__}") for op in batch.transforms_cls]
    sl.SeededSamples.__getitem__ = clock.wrap("data: seeding + sample bookkeeping", sl.SeededSamples.__getitem__)
    DetDataset.__getitem__ = clock.wrap(
        lambda ds, *a: "data: roidb copy" if ds is train_ds else "evaluation: data loading",
        DetDataset.__getitem__)
    sl.SeededCollate.__call__ = clock.wrap("batch: collate (stack into arrays)", sl.SeededCollate.__call__)
    model = trainer.model
    model.forward = clock.wrap(lambda *a: "forward" if model.training else "evaluation: inference", model.forward)
    head = model.yolo_head
    head.get_loss = clock.wrap("loss (assigner + losses)", head.get_loss)
    head.post_process = clock.wrap("evaluation: inference", head.post_process)
    paddle.Tensor.backward = clock.wrap("backward", paddle.Tensor.backward)
    opt = trainer.optimizer
    opt.step = clock.wrap("optimizer update (clip + momentum)", opt.step)
    opt.clear_grad = clock.wrap("optimizer update (clip + momentum)", opt.clear_grad)
    trainer.lr.step = clock.wrap("optimizer update (clip + momentum)", trainer.lr.step)
    if trainer.use_ema:
        trainer.ema.update = clock.wrap("EMA update", trainer.ema.update)
        trainer.ema.apply = clock.wrap("evaluation: EMA swap", trainer.ema.apply)
    trainer._eval_with_loader = clock.wrap("evaluation: loop (other)", trainer._eval_with_loader)
    session.cb.checkpointing.write = clock.wrap("checkpointing", session.cb.checkpointing.write)
    saver = session.cb.saver
    saver.on_epoch_end = clock.wrap("best/last weights", saver.on_epoch_end)
    comp = trainer._compose_callback
    for hook in ("on_step_begin", "on_step_end", "on_epoch_begin", "on_epoch_end"):
        setattr(comp, hook, clock.wrap("callbacks (log, progress, history)", getattr(comp, hook)))
    from ppdet.metrics import COCOMetric

    COCOMetric.update = clock.wrap("evaluation: pycocotools", COCOMetric.update)
    COCOMetric.accumulate = clock.wrap("evaluation: pycocotools", COCOMetric.accumulate)
    ses.finish_run = clock.wrap("final evaluation of the best weights + plot", ses.finish_run)


def cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (loader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_arm(work: Path, arm: str, epochs: int, profile: bool) -> dict:
    """One arm in this process: build the session, instrument it, train, return totals (and the profile)."""
    from detect.heavy import paddle_stack
    from detect.linespec import LineSpec
    from detect.ppyoloe import RunPaths
    from detect.preflight import check_settings

    paddle = paddle_stack().paddle
    overrides = dict(ARMS[arm])
    flags = overrides.pop("_flags", {})
    if flags:
        paddle.set_flags(flags)
    paddle.set_device("cpu")
    spec = LineSpec.load(next((work / "line").glob("*.yaml")))
    spec = spec.with_cli({"train": {**FRAME, "epochs": epochs, "pretrained": str(BASE), **overrides}})
    check_settings(spec)
    run = RunPaths(work / "runs" / f"{arm}-{time.time_ns()}")
    run.root.mkdir(parents=True)
    import detect.session as ses

    clock = PhaseClock()
    c0, w0 = cpu_seconds(), time.perf_counter()
    session = ses.build_session(spec, run)
    c_build, w_build = cpu_seconds() - c0, time.perf_counter() - w0
    if profile:
        instrument(session, clock)
    c1, w1 = cpu_seconds(), time.perf_counter()
    result = ses.run_session(session, quiet=True)
    cpu, wall = cpu_seconds() - c1, time.perf_counter() - w1
    history = [json.loads(x) for x in run.history.read_text().splitlines()]
    steps = len(session.loader) * len(history)
    images = steps * session.loader.batch_size
    out = {"arm": arm, "overrides": ARMS[arm], "epochs": len(history), "steps": steps, "images": images,
           "evaluations": sum(1 for h in history if "map50_95" in h),
           "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "build_cpu_s": round(c_build, 2),
           "build_wall_s": round(w_build, 2),
           "images_per_cpu_s": round(images / cpu, 3), "images_per_wall_s": round(images / wall, 3),
           "map50_95": result.metrics["val"]["map50_95"], "map50": result.metrics["val"]["map50"],
           "stop_reason": result.metrics["stop_reason"]}
    if profile:
        out["phases"] = {k: {"cpu_s": round(clock.cpu[k], 3), "wall_s": round(clock.wall[k], 3),
                             "calls": clock.calls[k], "thread": clock.thread_of[k]} for k in clock.cpu}
    return out


def make_line(work: Path, count: int, seed: int) -> None:
    from first_model import make_line as first_model_line

    first_model_line(work, count, seed)


def print_profile(row: dict) -> list[str]:
    phases = row["phases"]
    total_cpu, total_wall = row["cpu_s"], row["wall_s"]
    lines = [f"Profile of arm '{row['arm']}': {row['steps']} steps, {row['images']} training images, "
             f"{row['evaluations']} evaluations, {total_cpu:.1f} CPU s, {total_wall:.1f} wall s",
             "", "| phase | thread | CPU s | CPU share | wall s | wall share | calls |", "|---|---|---|---|---|---|---|"]
    attributed = 0.0
    main_wall = 0.0
    for name, p in sorted(phases.items(), key=lambda kv: -kv[1]["cpu_s"]):
        main = p["thread"] == "MainThread"
        attributed += p["cpu_s"]
        main_wall += p["wall_s"] if main else 0.0
        wall_share = f"{100 * p['wall_s'] / total_wall:.1f} %" if main else "(background)"
        lines.append(f"| {name} | {'main' if main else 'loader'} | {p['cpu_s']:.2f} | "
                     f"{100 * p['cpu_s'] / total_cpu:.1f} % | {p['wall_s']:.2f} | {wall_share} | {p['calls']} |")
    lines.append(f"| not attributed (ppdet loop, paddle bookkeeping, waiting) | | {total_cpu - attributed:.2f} | "
                 f"{100 * (total_cpu - attributed) / total_cpu:.1f} % | {total_wall - main_wall:.2f} | "
                 f"{100 * (total_wall - main_wall) / total_wall:.1f} % | |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default="before,defaults", help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per arm (3; 13 steps each at batch 8)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the arms this many times")
    ap.add_argument("--count", type=int, default=150, help="images in the line (150; 30 %% validation)")
    ap.add_argument("--seed", type=int, default=20261130)
    ap.add_argument("--no-profile", action="store_true", help="totals only (no timing wrappers)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "train_profile.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        row = run_arm(args.work, args.child, args.epochs, not args.no_profile)
        print("ROW " + json.dumps(row), flush=True)
        return 0
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    if [a for a in names if a not in ARMS]:
        ap.error(f"unknown arm(s); choose from {list(ARMS)}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        make_line(work, args.count, args.seed)
        for rnd in range(args.rounds):
            for name in names:
                cmd = [sys.executable, __file__, "--child", name, "--work", str(work), "--epochs", str(args.epochs)]
                cmd += ["--no-profile"] if args.no_profile else []
                print(f"== round {rnd + 1}, arm {name}", flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                got = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
                if proc.returncode or not got:
                    print(proc.stdout[-3000:], proc.stderr[-3000:])
                    return 1
                row = {**json.loads(got[0]), "round": rnd + 1}
                rows.append(row)
                print(f"   {row['images_per_cpu_s']} img/CPU-s  {row['images_per_wall_s']} img/wall-s  "
                      f"{row['evaluations']} evals  mAP50-95 {row['map50_95']:.3f}", flush=True)
    out: list[str] = []
    for name in names:
        first = next(r for r in rows if r["arm"] == name)
        out += print_profile(first) + [""] if "phases" in first else []
    ref = names[0]
    out += [f"| arm | overrides | img / CPU-s | img / wall-s | vs {ref} (CPU) | vs {ref} (wall) | evals | mAP50-95 |",
            "|---|---|---|---|---|---|---|---|"]
    for name in names:
        mine = [r for r in rows if r["arm"] == name]
        base = [r for r in rows if r["arm"] == ref]
        ipc = sum(r["images"] for r in mine) / sum(r["cpu_s"] for r in mine)
        ipw = sum(r["images"] for r in mine) / sum(r["wall_s"] for r in mine)
        bpc = sum(r["images"] for r in base) / sum(r["cpu_s"] for r in base)
        bpw = sum(r["images"] for r in base) / sum(r["wall_s"] for r in base)
        what = ", ".join(f"{k}={v}" for k, v in ARMS[name].items()) or "(defaults)"
        out.append(f"| {name} | {what} | {ipc:.2f} | {ipw:.2f} | {ipc / bpc:.2f} | {ipw / bpw:.2f} | "
                   f"{mine[-1]['evaluations']} | {sum(r['map50_95'] for r in mine) / len(mine):.3f} |")
    print("\n".join(out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["python", "bench/train_profile.py"] + sys.argv[1:]),
                                    "cpu": _cpu_name(), "load_before": os.getloadavg(),
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows,
                                    "table": out}, indent=1))
    print(f"results: {args.out}")
    return 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    sys.exit(main())
