"""Does a retrain that adds a defect class forget the old ones, and what does it cost? Five strategies, one run.

    python bench/retrain_forgetting.py [--epochs 0] [--full-epochs 12] [--rows kit,no-distill,ewc,full,naive]

Parent: the kit's base detector cut to its first five classes, on a five-class synthetic line (48 images,
320 px). New data: images showing only the sixth class (spurious_copper), labelled only with it: what an
engineer sends when a new defect appears. Strategies, each a real ppdet training of ``--epochs``:

- kit: ``defectkit retrain`` defaults, no flag (parent images replayed, class head grown keeping old rows, backbone
  frozen, the parent as a frozen teacher, epochs from the new data's share, lr x 0.2, early stopping);
- no-distill: the same without the teacher (``retrain.distill 0``, ``distill_dfl 0``);
- ewc: without the teacher, with the EWC penalty (``retrain.ewc``, Fisher computed once in the parent's run);
- full: a full retrain on all data (old + new) from the same start: nothing frozen, no teacher, the parent's own
  lr, ``--full-epochs`` with the same early stopping;
- naive: new images only, starting from the parent weights with ppdet's own loader (the mismatched class head
  is skipped, so re-initialised), as a plain ``defectkit train --pretrained`` would.

Every model is scored on the parent's validation set (old classes, per class) by the same gate code. Compute is
the process's CPU seconds (``time.process_time``) of each row, training and the gate's evaluations included.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zlib  # noqa: E402,F401  -- before paddle (import-order segfault, STACK.md)

TRAIN = {"batch_size": 4, "multiscale": False, "warmup_steps": 4, "visualdl": False}


def setup(tmp: Path, new_images: int):
    from detect.data.defects import DEFECT_CLASSES
    from detect.data.synth import generate_line
    from detect.head_surgery import first_classes_model
    from dataclasses import replace

    from detect.ppyoloe import RunPaths
    from detect.run_settings import load_run_spec, write_run_settings

    spec = generate_line(tmp / "old", line="pcb-bench", count=48, seed=21, val_fraction=0.25, progress=False,
                         classes=DEFECT_CLASSES[:5])
    generate_line(tmp / "new", line="pcb-bench", count=new_images, seed=33, val_fraction=0.25, progress=False,
                  classes=DEFECT_CLASSES[5:])
    parent = RunPaths(tmp / "runs" / "pcb-bench" / "parent")
    first_classes_model(ROOT / "base_weights" / "pcb-base-tiny-320.pdparams", 5, parent.best_weights)
    write_run_settings(parent.root, spec)  # a run of the kit: its settings.yaml is its spec
    parent.metrics.write_text(json.dumps({"classes": list(DEFECT_CLASSES[:5])}))
    six = replace(load_run_spec(parent.root), classes=list(DEFECT_CLASSES))
    path = six.save(tmp / "pcb-bench-v2.yaml")
    return parent, replace(six, source=path.resolve())


def naive(parent, kit_run: Path, out: Path, epochs: int):
    """ppdet's plain fine-tune on the new images only: mismatched head tensors skipped by load_pretrain_weight."""
    from dataclasses import replace

    from detect.data.coco import load_coco, subset, write_coco
    from detect.forgetting import judge
    from detect.infer import evaluate_weights
    from detect.linespec import DataPaths
    from detect.retrain_data import load_parent
    from detect.run_settings import load_run_spec
    from detect.train import train

    kit = load_run_spec(kit_run)  # the kit's retrain as recorded: same epochs, lr, freeze, batch ...
    data = kit_run / "data"
    train_coco = load_coco(data / "train.json")
    only_new = subset(train_coco, [im["id"] for im in train_coco["images"] if not im["file_name"].startswith("parent-")])
    write_coco(out / "new_only.json", only_new)
    spec = replace(kit, paths=DataPaths(data, data / "images", out / "new_only.json", data / "val.json"))
    # ... but from the parent's own weights (the grown head's new rows are ppdet's fresh init instead)
    spec = spec.with_settings(spec.settings.with_values("train", pretrained=str(parent.best_weights)))
    r = spec.settings.retrain
    result = train(spec, out / "naive", quiet=True)
    p = load_parent(parent.root)
    before = evaluate_weights(p.spec, p.weights, p.spec.paths.val, out / "naive-eval-parent")
    after = evaluate_weights(spec, result.run.best_weights, data / "val_old.json", out / "naive-eval-old")
    from detect.evaluate import EvalResult

    val = result.metrics["val"]
    merged = EvalResult(val["map50_95"], val["map50"], {k: float("nan") if v is None else v for k, v in val["per_class"].items()},
                        {k: float("nan") if v is None else v for k, v in val["per_class_ap50"].items()})
    return judge(before, after, p.spec.classes, merged, r.max_map_drop, r.max_class_drop, r.min_new_class_ap50)


ROWS = ("kit", "no-distill", "ewc", "full", "naive")


def kit_row(parent, tmp: Path, six, name: str, layer: dict, epochs: int | None) -> dict:
    from detect.retrain import retrain

    retrain_layer = dict(layer.get("retrain", {}))
    if epochs:
        retrain_layer["epochs"] = epochs
    wall, cpu = time.time(), time.process_time()
    res = retrain(parent.root, [tmp / "new"], six, parent.root.parent / name,
                  {"retrain": retrain_layer, "train": {**TRAIN, **layer.get("train", {})}}, quiet=True)
    return {"seconds": round(time.time() - wall, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            "epochs_run": res.metrics.get("epochs_run"), "epochs": res.record["policy"]["epochs"],
            "epochs_why": res.record["policy"]["why"], "stop_reason": res.metrics.get("stop_reason"),
            **res.verdict.to_dict()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=0, help="kit rows: retrain.epochs (0: the kit's rule)")
    ap.add_argument("--full-epochs", type=int, default=12, help="full retrain: epochs (early stopping as the kit)")
    ap.add_argument("--ewc", type=float, default=10.0, help="retrain.ewc of the EWC row")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--new-images", type=int, default=24)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "retrain_forgetting.json")
    args = ap.parse_args()
    from detect.run_settings import load_run_spec

    wanted = [r for r in args.rows.split(",") if r]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parent, six = setup(tmp, args.new_images)
        parent_lr = load_run_spec(parent.root).settings.train.lr
        layers = {
            "kit": {},  # defaults: teacher distillation on, epochs from the new data's share, lr x 0.2
            "no-distill": {"retrain": {"distill": 0.0, "distill_dfl": 0.0}},
            "ewc": {"retrain": {"distill": 0.0, "distill_dfl": 0.0, "ewc": args.ewc}},
            # everything trains (nothing frozen, no teacher) at the parent's own lr on all data, same early stopping
            "full": {"retrain": {"distill": 0.0, "distill_dfl": 0.0, "freeze": "none"},
                     "train": {"lr": parent_lr, "epochs": args.full_epochs}},
        }
        for name in wanted:
            if name == "naive":
                continue
            rows[name] = kit_row(parent, tmp, six, name, layers[name], args.epochs if name != "full" else None)
            print(name, json.dumps({k: rows[name][k] for k in ("seconds", "cpu_seconds", "epochs_run", "drop_points",
                                                               "new_classes_ap50", "passed")}), flush=True)
        if "naive" in wanted:
            kit_run = next(parent.root.parent / n for n in ("kit", "no-distill", "ewc", "full") if n in rows)
            wall, cpu = time.time(), time.process_time()
            rows["naive"] = {**naive(parent, kit_run, tmp, load_run_spec(kit_run).settings.train.epochs).to_dict()}
            rows["naive"].update(seconds=round(time.time() - wall, 1), cpu_seconds=round(time.process_time() - cpu, 1))
    full_cpu = rows.get("full", {}).get("cpu_seconds")
    print(f"{'strategy':<11} {'old mAP50-95':>15} {'change':>8} {'worst class':>22} {'new AP50':>9} {'gate':>8} "
          f"{'epochs':>6} {'wall s':>7} {'CPU s':>7} {'CPU vs full':>11}")
    for name, r in rows.items():
        worst = max(r["classes"], key=lambda c: c["drop_points"] or -1e9)
        worst_text = f"{worst['name']} {-worst['drop_points']:+.2f}"
        new50 = next(iter(r["new_classes_ap50"].values()), None)
        new_text = "n/a" if new50 is None else f"{new50:.3f}"
        share = f"{r['cpu_seconds'] / full_cpu:.0%}" if full_cpu else "n/a"
        print(f"{name:<11} {r['old_map_parent']:.4f}->{r['old_map_retrained']:.4f} {-r['drop_points']:+8.2f} "
              f"{worst_text:>22} {new_text:>9} {'passed' if r['passed'] else 'REFUSED':>8} "
              f"{str(r.get('epochs_run', '')):>6} {r['seconds']:7.1f} {r['cpu_seconds']:7.1f} {share:>11}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/retrain_forgetting.py " + " ".join(sys.argv[1:]),
                                    "epochs": args.epochs, "full_epochs": args.full_epochs, "ewc": args.ewc,
                                    "new_images": args.new_images, "rows": rows}, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
