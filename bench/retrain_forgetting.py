"""Does a retrain that adds a defect class forget the old ones, and what does it cost? All strategies, one run.

    python bench/retrain_forgetting.py                       # 3 seeds, rows a-e (+ c1, c2), k-shot 5 and 10
    python bench/retrain_forgetting.py --seeds 1 --k-shot ""  # one seed of rows a-e (+ c1, c2)
    python bench/retrain_forgetting.py --quick               # small development run (minutes)

Setting (the issue's): a five-class synthetic line (``--old-images``, 30 % held out: 60 validation images at the
default 200), its **parent fine-tuned on the line** from the kit's base detector cut to five classes (``train``
with the kit's first-model settings, ``--parent-epochs`` with early stopping). New data: images of the sixth class
(spurious_copper) labelled only with it — ``--new-images`` for training (k = 20 by default) and 20 held-out images
of it for the new-class AP50, from one pool, so every row and every k is scored on the same images. Rows, per seed
(``train.seed``; the parent and the data stay the same):

- (a) full: a full retrain from the base (cut to five classes, head grown to six: the new row starts at the prior,
  as in every other row) on all data (old + new), nothing frozen, no teacher, the parent's lr, ``--parent-epochs``
  with the parent's early-stopping rule — what retraining the line from scratch costs;
- (b) naive: ``train --pretrained PARENT`` on the new images only (ppdet re-initialises the mismatched class head),
  the kit's epochs, lr and freeze;
- (c) kit: ``defectkit retrain`` with no flag (replay ``retrain.replay`` of the parent's images, head grown keeping
  old rows, backbone frozen, the parent as a frozen teacher, an EWC penalty (``retrain.ewc`` 10), epochs from the
  new data's share, lr x 0.2, early stop);
- (c1) kit with half the parent's images replayed (``--replay 0.5``, the default before 2026-12-01) and (c2) with a
  tenth (``--replay 0.1``): what the replay share buys and costs;
- (d) kit without the teacher (``--distill 0 --set distill_dfl=0``);
- (e) kit without EWC (``--ewc 0``, the default before 2026-12-01). The kit's default EWC penalty needs the parent's
  Fisher information, computed once per parent and kept in its run: any Fisher file left in ``--workdir`` by an
  earlier run is deleted at the start, so the first kit row of seed 0 pays for it;
- k-shot: (c) with only k new training images (``--k-shot``).

Every model is judged by the retrain's own gate code on the parent's validation set (old classes) and on the merged
validation set (new class). Wall seconds and the process's CPU seconds per row include training, the teacher and
the gate's evaluations. Prints the table and writes ``--out`` (JSON with every row and seed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zlib  # noqa: E402,F401  -- before paddle (import-order segfault, STACK.md)

BASE = ROOT / "base_weights" / "pcb-base-tiny-320.pdparams"
NEW_VAL = 20
KIT_ROWS = ("c", "c1", "c2", "d", "e")  # `defectkit retrain` with the layers of kit_row; (a), (b) are plain trains
ROWS = ("a", "b", *KIT_ROWS)
NAMES = {"a": "(a) full retrain from the base, all data", "b": "(b) naive fine-tune, new data only",
         "c": "(c) kit defaults, no flag", "c1": "(c1) kit, --replay 0.5 (previous default)",
         "c2": "(c2) kit, --replay 0.1",
         "d": "(d) kit without the teacher", "e": "(e) kit without EWC (--ewc 0)"}


def _folder(src, dst: Path, train_ids: list[int]) -> Path:
    """A data folder in the kit's layout holding ``train_ids`` of the pool for training and the pool's val images."""
    from detect.data.coco import Layout, load_coco, subset, write_coco

    pool = Layout(src)
    (dst / "annotations").mkdir(parents=True)
    os.symlink(pool.images, dst / "images")
    write_coco(dst / "annotations" / "train.json", subset(load_coco(pool.train), train_ids))
    write_coco(dst / "annotations" / "val.json", load_coco(pool.val))
    return dst


def setup(tmp: Path, args) -> dict:
    """Old line, fine-tuned parent, the new-class pool and one --add folder per k."""
    from detect.data.coco import load_coco
    from detect.data.defects import DEFECT_CLASSES
    from detect.data.split import stratified_split
    from detect.head_surgery import first_classes_model
    from detect.linespec import LineSpec
    from detect.ppyoloe import RunPaths
    from detect.run_settings import load_run_spec
    from detect.train import train

    done = tmp / "runs" / "pcb-bench" / "parent"
    if (done / "metrics.json").is_file() and (tmp / "setup.json").is_file():  # --workdir of an earlier run
        info = json.loads((tmp / "setup.json").read_text())
        return {"parent": RunPaths(done), "six": LineSpec.load(tmp / "pcb-bench-v2.yaml"), "base5": tmp / "base5.pdparams",
                "adds": {int(k): Path(v) for k, v in info["adds"].items()}, "parent_info": info["parent_info"]}
    old = generate(tmp / "old", args.old_images, 21, 0.3, DEFECT_CLASSES[:5])
    pool_count = max(args.k_list + [args.new_images]) + NEW_VAL
    generate(tmp / "pool", pool_count, 33, NEW_VAL / pool_count, DEFECT_CLASSES[5:])
    pool_train = load_coco(tmp / "pool" / "annotations" / "train.json")
    ids = [im["id"] for im in pool_train["images"]]
    adds = {}
    for k in sorted(set(args.k_list + [args.new_images])):  # stratified subsets: defect-free images keep their share
        chosen = ids if k >= len(ids) else [im["id"] for im in stratified_split(pool_train, 1 - k / len(ids), 0)[0]["images"]]
        adds[k] = _folder(tmp / "pool", tmp / f"new-k{k}", chosen)
    base5 = first_classes_model(BASE, 5, tmp / "base5.pdparams")
    first = old.with_cli({"train": {"epochs": args.parent_epochs, "patience": args.patience, "multiscale": False,
                                    "visualdl": False, "time_budget_min": 0.0, "pretrained": str(base5)}})
    wall = time.time()
    result = train(first, tmp / "runs" / "pcb-bench" / "parent", quiet=True)
    six = replace(load_run_spec(result.run.root), classes=list(DEFECT_CLASSES))  # as `--spec` with a class appended
    six = LineSpec.load(six.save(tmp / "pcb-bench-v2.yaml"))
    parent_info = {"seconds": round(time.time() - wall, 1), "epochs_run": result.metrics["epochs_run"],
                   "stop_reason": result.metrics["stop_reason"], "val_map50_95": result.metrics["val"]["map50_95"],
                   "train_images": len(load_coco(old.paths.train)["images"]),
                   "val_images": len(load_coco(old.paths.val)["images"])}
    print("parent", json.dumps(parent_info), flush=True)
    (tmp / "setup.json").write_text(json.dumps({"adds": {k: str(v) for k, v in adds.items()}, "parent_info": parent_info}))
    return {"parent": result.run, "six": six, "adds": adds, "base5": base5, "parent_info": parent_info}


def generate(out: Path, count: int, seed: int, val_fraction: float, classes):
    from detect.data.synth import generate_line

    return generate_line(out, line="pcb-bench", count=count, seed=seed, val_fraction=val_fraction, progress=False,
                         classes=tuple(classes))


def gate(parent_run, spec, weights: Path, merged_val: dict, data: Path, out: Path):
    """The retrain's gate on any model: old classes on the parent's val set, new class on the merged val set."""
    from detect.evaluate import EvalResult
    from detect.forgetting import judge
    from detect.infer import evaluate_weights
    from detect.retrain_data import load_parent

    p = load_parent(parent_run.root)
    r = spec.settings.retrain
    before = evaluate_weights(p.spec, p.weights, p.spec.paths.val, out / "eval-parent")
    after = evaluate_weights(spec, weights, (data / "val_old.json").resolve(), out / "eval-old")
    nan = lambda d: {k: float("nan") if v is None else v for k, v in d.items()}  # noqa: E731
    merged = EvalResult(merged_val["map50_95"], merged_val["map50"], nan(merged_val["per_class"]),
                        nan(merged_val["per_class_ap50"]))
    return judge(before, after, p.spec.classes, merged, r.max_map_drop, r.max_class_drop, r.min_new_class_ap50)


def plain_row(ctx, tmp: Path, name: str, seed: int, kit_run: Path) -> dict:
    """(a) or (b): ``train`` on data the kit merged, judged by the same gate."""
    from detect.data.coco import load_coco, subset, write_coco
    from detect.head_surgery import write_grown_weights
    from detect.linespec import DataPaths
    from detect.retrain_data import load_parent, merge_data
    from detect.run_settings import load_run_spec
    from detect.train import train

    out = tmp / f"{name}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a reused --workdir: the row runs again
    out.mkdir()
    wall, cpu = time.time(), time.process_time()
    parent = load_parent(ctx["parent"].root)
    kit = load_run_spec(kit_run)
    if name == "a":  # every parent image + the new ones; the parent's own training recipe from the grown base
        merged = merge_data(parent, [ctx["adds"][ctx["k"]]], ctx["six"].classes, out / "data", 1.0, seed)
        init = write_grown_weights(ctx["base5"], 5, 6, out / "base6.pdparams")
        t = parent.spec.settings.train
        spec = replace(kit, paths=DataPaths(out / "data", merged.images, merged.train, merged.val))
        spec = spec.with_settings(spec.settings.with_values(
            "train", pretrained=str(init), freeze="none", lr=t.lr, epochs=t.epochs, patience=t.patience, seed=seed))
        data = out / "data"
    else:  # the new images only, from the parent's weights as ppdet loads them (class head re-initialised)
        data = kit_run / "data"
        coco = load_coco(data / "train.json")
        write_coco(out / "new_only.json", subset(coco, [im["id"] for im in coco["images"]
                                                         if not im["file_name"].startswith("parent-")]))
        spec = replace(kit, paths=DataPaths(data, data / "images", out / "new_only.json", data / "val.json"))
        spec = spec.with_settings(spec.settings.with_values("train", pretrained=str(parent.weights), seed=seed))
    result = train(spec, out / "run", quiet=True)
    verdict = gate(ctx["parent"], spec, result.run.best_weights, result.metrics["val"], data, out)
    return finish_row(wall, cpu, result.metrics, verdict, spec.settings.train.epochs)


def kit_row(ctx, name: str, seed: int, k: int) -> dict:
    from detect.retrain import retrain

    layers = {"c": {}, "c1": {"retrain": {"replay": 0.5}}, "c2": {"retrain": {"replay": 0.1}},
              "d": {"retrain": {"distill": 0.0, "distill_dfl": 0.0}},
              "e": {"retrain": {"ewc": 0.0}}}[name]
    cli = {**layers, "train": {"seed": seed}}
    run = ctx["parent"].root.parent / f"{name}-k{k}-s{seed}"
    shutil.rmtree(run, ignore_errors=True)  # a reused --workdir: the row runs again
    wall, cpu = time.time(), time.process_time()
    res = retrain(ctx["parent"].root, [ctx["adds"][k]], ctx["six"], run, cli, quiet=True)
    row = finish_row(wall, cpu, res.metrics, res.verdict, res.record["policy"]["epochs"])
    row.update(epochs_why=res.record["policy"]["why"], run=str(res.run.root),
               train_images=len(json.loads((res.run.root / "data" / "train.json").read_text())["images"]))
    return row


def finish_row(wall: float, cpu: float, metrics: dict, verdict, epochs: int) -> dict:
    new50 = next(iter(verdict.new_classes_ap50.values()), None)
    worst = max((c for c in verdict.classes if c.drop_points is not None), key=lambda c: c.drop_points)
    return {"seconds": round(time.time() - wall, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            "epochs": epochs, "epochs_run": metrics.get("epochs_run"), "stop_reason": metrics.get("stop_reason"),
            "change_points": -verdict.drop_points, "worst_class": worst.name, "worst_change": -worst.drop_points,
            "new_ap50": new50, "passed": verdict.passed, "verdict": verdict.to_dict()}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {(max(values) - min(values)) / 2:.2f}"


def table(rows: dict[str, list[dict]], k_default: int) -> list[str]:
    """Mean ± half-range over seeds per row; cost relative to (a)."""
    mean = lambda key, name: statistics.mean(r[key] for r in rows[name])  # noqa: E731
    a_wall = mean("seconds", "a") if rows.get("a") else None
    a_cpu = mean("cpu_seconds", "a") if rows.get("a") else None
    a_new = mean("new_ap50", "a") if rows.get("a") and all(r["new_ap50"] is not None for r in rows["a"]) else None
    out = ["| row | seeds | old classes mAP50-95 change (pt) | worst old class (pt) | new class AP50 | gate "
           "(passed/seeds) | epochs run | wall s | CPU s | wall vs (a) | CPU vs (a) | new AP50 vs (a) |",
           "|---|---:|---:|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for name, runs in rows.items():
        if not runs:
            continue
        worst = min(runs, key=lambda r: r["worst_change"])
        new = [r["new_ap50"] for r in runs if r["new_ap50"] is not None]
        new_text = f"{statistics.mean(new):.3f}" + (f" ± {(max(new) - min(new)) / 2:.3f}" if len(new) > 1 else "") \
            if new else "n/a"
        wall, cpu = mean("seconds", name), mean("cpu_seconds", name)
        label = NAMES.get(name.split("@")[0], name)
        if "@" in name:
            label = f"(c) kit defaults, k = {name.split('@')[1]} new images"
        elif name in KIT_ROWS or name == "b":
            label += f" (k = {k_default})"
        out.append(f"| {label} | {len(runs)} | {spread([r['change_points'] for r in runs])} | {worst['worst_class']} "
                   f"{worst['worst_change']:+.2f} | {new_text} | {sum(r['passed'] for r in runs)}/{len(runs)} | "
                   f"{'/'.join(str(r['epochs_run']) for r in runs)} | {wall:.0f} | {cpu:.0f} | "
                   f"{f'{wall / a_wall:.0%}' if a_wall else 'n/a'} | {f'{cpu / a_cpu:.0%}' if a_cpu else 'n/a'} | "
                   f"{f'{statistics.mean(new) / a_new:.0%}' if a_new and new else 'n/a'} |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per row (0, 1, ...)")
    ap.add_argument("--k-shot", default="5,10", help="comma-separated k of the k-shot rows ('' = none; k = "
                                                      "--new-images is row (c) itself)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    ap.add_argument("--quick", action="store_true", help="development run: 60 old images, 3 parent epochs, 1 seed, k 5")
    ap.add_argument("--old-images", type=int, default=200)
    ap.add_argument("--new-images", type=int, default=20)
    ap.add_argument("--parent-epochs", type=int, default=12, help="parent fine-tune and (a): most epochs")
    ap.add_argument("--patience", type=int, default=3, help="parent fine-tune and (a): early stopping patience")
    ap.add_argument("--workdir", type=Path, help="keep data, parent and runs here (reused by a later run: the parent "
                                                  "is not trained again)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "retrain_forgetting.json")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.old_images, args.parent_epochs, args.new_images = 1, 60, 3, 8
        args.k_shot = "5" if args.k_shot == "5,10" else args.k_shot
    args.k_list = [int(k) for k in args.k_shot.split(",") if k.strip()]
    wanted = [r for r in args.rows.split(",") if r]
    order = [r for r in ("c", "a", "b", *KIT_ROWS[1:]) if r in wanted]  # (a), (b) reuse a kit row's merged data
    rows: dict[str, list[dict]] = {r: [] for r in ROWS if r in wanted}
    rows.update({f"c@{k}": [] for k in args.k_list if k != args.new_images})
    start = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.workdir or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        ctx = setup(tmp, args)
        from detect.ewc import fisher_files

        for f in fisher_files(ctx["parent"].root):  # an earlier run's: the Fisher's cost belongs in this run
            f.unlink(missing_ok=True)
        save = lambda: write(args, rows, ctx, start)  # noqa: E731  -- after every row: a late crash keeps the rest
        ctx["k"] = args.new_images
        for seed in range(args.seeds):
            for name in order:
                if name in ("a", "b"):
                    kit_run = next((Path(r[-1]["run"]) for n, r in rows.items() if n in KIT_ROWS and r), None)
                    if kit_run is None:
                        kit_row_ = kit_row(ctx, "c", seed, args.new_images)
                        kit_run = Path(kit_row_["run"])
                    row = plain_row(ctx, tmp, name, seed, kit_run)
                else:
                    row = kit_row(ctx, name, seed, args.new_images)
                rows[name].append(row)
                save()
                print(f"seed {seed} {name}", json.dumps({k: row[k] for k in ("seconds", "cpu_seconds", "epochs_run",
                                                                          "change_points", "new_ap50", "passed")}),
                      flush=True)
            for k in args.k_list:
                if k == args.new_images:
                    continue
                rows[f"c@{k}"].append(kit_row(ctx, "c", seed, k))
                save()
                print(f"seed {seed} k={k}", json.dumps({key: rows[f'c@{k}'][-1][key] for key in (
                    "seconds", "epochs_run", "change_points", "new_ap50", "passed")}), flush=True)
    print("\n".join(write(args, rows, ctx, start)))
    print(f"results: {args.out}")
    return 0


def write(args, rows: dict, ctx: dict, start: float) -> list[str]:
    """The table so far, and the JSON with every row (atomically: a reader never sees half a file)."""
    from edge_runtime.fileio import atomic_write_text

    lines = table({k: v for k, v in rows.items() if v}, args.new_images)
    atomic_write_text(args.out, json.dumps({
        "command": "python bench/retrain_forgetting.py " + " ".join(sys.argv[1:]), "cpu": _cpu(),
        "load_average_at_end": os.getloadavg(), "seconds": round(time.time() - start), "parent": ctx["parent_info"],
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}, "table": lines, "rows": rows},
        indent=1, default=str))
    return lines


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
