"""A new line's first model: the old training defaults vs the mission's recipe, equal CPU time, one run.

    python bench/first_model.py                      # 6 arms x 3 min at 1 thread, ~21 min; table + JSON
    python bench/first_model.py --minutes 2 --arms old,recipe

The line is one the kit's base never saw: ``detect.data.foreign`` boards (non-square frames of four sizes, PNG and
JPG) with other defects (scratch, dent, stain: another class count, so the base's class head is re-initialised),
its own seed, split stratified 70/30 (``foreign``'s own split holds only scratches in validation). Every arm fine-tunes the shipped base (``base_weights/pcb-base-tiny-320``, the spec ``data import``
writes) with the same time budget (``train.time_budget_min``; the budget binds, ``epochs`` is set high), one
thread, evaluation every epoch inside the budget, arms one after the other in one process. Each arm differs from
the old defaults only in what its name says. Reported per arm: mAP50 / mAP50-95 of its best weights on the
validation set, epochs run, best epoch, training images per second (epochs x images / training minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zlib  # noqa: E402,F401  -- before paddle (import-order segfault, STACK.md)

# The defaults before issue 11 (detect/defaults.yaml at 8becd6a), pinned so the comparison survives new defaults.
OLD = {"freeze": "none", "mosaic": 0.0, "close_mosaic": 0, "patience": 0, "warmup_steps": 150}
ARMS = {
    "old": {},
    "freeze-2": {"freeze": "2"},
    "freeze-backbone": {"freeze": "backbone"},
    "mosaic": {"mosaic": 0.5, "close_mosaic": 1},
    "recipe": {"freeze": "2", "mosaic": 0.5, "close_mosaic": 1, "patience": 10},  # first guess, before measuring
    "warmup-30": {"warmup_steps": 30},  # the 150-step warmup is most of a short budget's ~130 steps
    "warmup-30+freeze-2": {"warmup_steps": 30, "freeze": "2"},
    "warmup-30+mosaic": {"warmup_steps": 30, "mosaic": 0.5, "close_mosaic": 1},
}


def make_line(root: Path, count: int, seed: int):
    """The foreign line, re-split stratified (its own split puts only scratches into validation)."""
    from detect.data.coco import Layout, load_coco, write_coco
    from detect.data.foreign import make_foreign_coco
    from detect.data.split import stratified_split
    from detect.linespec import LineSpec

    spec_path = make_foreign_coco(root / "line", count=count, seed=seed)
    layout = Layout(root / "line")
    train, val = stratified_split(load_coco(layout.all), 0.3, seed)
    write_coco(layout.train, train)
    write_coco(layout.val, val)
    return LineSpec.load(spec_path)


def run_arm(spec, name: str, overrides: dict, minutes: float, work: Path) -> dict:
    from detect.train import train

    layer = {**OLD, **overrides, "time_budget_min": minutes, "epochs": 200, "eval_interval": 1,
             "visualdl": False, "keep_last": 1, "keep_weekly": False}
    t0 = time.time()
    result = train(spec.with_cli({"train": layer}), work / name, quiet=True)
    m = result.metrics
    n_train = len(json.loads(spec.paths.train.read_text())["images"])
    return {"arm": name, "overrides": overrides, "map50": m["val"]["map50"], "map50_95": m["val"]["map50_95"],
            "per_class_ap50": m["val"].get("per_class_ap50"), "epochs_run": m["epochs_run"],
            "best_epoch": m["best_epoch"], "stop_reason": m["stop_reason"], "train_minutes": m["train_minutes"],
            "images_per_s": round(m["epochs_run"] * n_train / max(1e-9, m["train_minutes"] * 60), 2),
            "wall_s": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="time budget per arm (3)")
    ap.add_argument("--arms", default="old,freeze-2,mosaic,warmup-30,warmup-30+freeze-2,warmup-30+mosaic", help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--count", type=int, default=150, help="images in the line (150; a third is validation)")
    ap.add_argument("--seed", type=int, default=20261130, help="seed of the line (20261130)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "first_model.json")
    args = ap.parse_args()
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    from detect.heavy import paddle_stack

    paddle_stack().paddle.set_device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        spec = make_line(work, args.count, args.seed)
        rows = []
        for name in names:
            print(f"== arm {name}: {ARMS[name] or 'old defaults'} ({args.minutes:g} min)", flush=True)
            rows.append(run_arm(spec, name, ARMS[name], args.minutes, work / "runs"))
            r = rows[-1]
            print(f"   mAP50 {r['map50']:.3f}  mAP50-95 {r['map50_95']:.3f}  epochs {r['epochs_run']} "
                  f"(best {r['best_epoch']})  {r['images_per_s']} img/s", flush=True)
    print(f"\n| arm | settings (on top of the old defaults) | mAP50 | mAP50-95 | epochs (best) | img/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        what = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "freeze none, mosaic 0, patience 0, warmup 150"
        print(f"| {r['arm']} | {what} | {r['map50']:.3f} | {r['map50_95']:.3f} | {r['epochs_run']} "
              f"({r['best_epoch']}) | {r['images_per_s']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "minutes": args.minutes, "count": args.count,
                                    "seed": args.seed, "threads": os.environ.get("OMP_NUM_THREADS"),
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "arms": rows}, indent=2))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
