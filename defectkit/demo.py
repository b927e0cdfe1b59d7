"""``defectkit demo``: the whole chain on a synthetic production line, end to end.

synth -> data check -> fine-tune -> evaluate -> export (paddle + ONNX, verified) -> compress (PTQ INT8
behind the accuracy gate) -> signed bundle -> edge runtime on held-back boards, reporting to a collector the
demo starts itself -> one report (Markdown + JSON) whose path is printed last. Every step is the same
function the CLI verbs and the tests call.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_LINE = "pcb-demo"


@dataclass
class DemoResult:
    out: Path
    report_md: Path
    report_json: Path
    summary: dict[str, Any] = field(default_factory=dict)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole chain on a synthetic PCB line and write a report")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default ./demo_out)")
    p.add_argument("--count", type=int, default=300, help="boards in the synthetic line (default 300)")
    p.add_argument("--holdout", type=int, default=40, help="held-back boards for the edge run (default 40)")
    p.add_argument("--minutes", type=float, default=None, help="training time budget (default: line spec)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: line spec)")
    p.add_argument("--pretrained", default=None, help="base weights to start from (path or URL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic line (default 0)")
    p.add_argument("--lite", action="store_true",
                   help="also convert to Paddle Lite .nb (x86 + ARM) in the edge box (needs root, ~2 min once)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.minutes is not None:
        overrides["time_budget_min"] = args.minutes
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.pretrained:
        overrides["pretrained"] = args.pretrained
    result = run_demo(args.out, count=args.count, holdout=args.holdout, seed=args.seed, overrides=overrides,
                      lite=args.lite)
    s = result.summary
    print(f"\nmAP50 {s['val']['map50']:.3f}  mAP50-95 {s['val']['map50_95']:.3f}  "
          f"edge verdict accuracy {s['edge']['verdict_accuracy']:.3f} on {s['edge']['images']} held-back boards")
    print(f"report: {result.report_md}")
    return 0


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def run_demo(out: Path, count: int = 300, holdout: int = 40, seed: int = 0,
             overrides: dict[str, Any] | None = None, lite: bool = False,
             compress_overrides: dict[str, Any] | None = None) -> DemoResult:
    """Run every stage into ``out``; returns the report paths and the figures in it."""
    from detect.data.check import check_target
    from detect.data.synth import generate_line
    from detect.linespec import LineSpec
    from detect.train import train

    out = Path(out).resolve()
    times: dict[str, float] = {}
    t = _step("1/6 synthesise the line")
    spec_path = out / "data" / DEMO_LINE / f"{DEMO_LINE}.yaml"
    if not spec_path.is_file():
        generate_line(out / "data" / DEMO_LINE, line=DEMO_LINE, count=count, seed=seed)
    spec = LineSpec.load(_demo_spec(spec_path))
    holdout_dir = out / "data" / "holdout"
    if not (holdout_dir / "annotations" / "all.json").is_file():
        generate_line(holdout_dir, line="holdout", count=holdout, seed=seed + 10_000, val_fraction=0.5)
    report = check_target(spec.source)
    report.raise_if_faulty()
    times["synth"] = time.time() - t

    t = _step("2/6 fine-tune PP-YOLOE+ (" + spec.model_size + f", {spec.image_size} px)")
    run_dir = out / "runs" / DEMO_LINE / "demo"
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        from detect.ppyoloe import RunPaths

        run = RunPaths(run_dir)
    else:
        result = train(spec.with_cli({"train": dict(overrides or {})}), run_dir)  # the command line, once
        metrics, run = result.metrics, result.run
    from detect.run_settings import load_run_spec

    spec = load_run_spec(run.root)  # every later stage works on what the run used (its settings.yaml)
    times["train"] = time.time() - t

    t = _step("3/6 export paddle inference + ONNX")
    from detect.cli import verify_export
    from detect.export import export

    exported = export(spec, run.best_weights, run.export_dir)
    agreement = verify_export(spec, run.export_dir)
    print(f"ONNX Runtime vs paddle.inference: {agreement.summary()}")
    times["export"] = time.time() - t

    t = _step("4/6 compress: INT8 (ONNX Runtime, PaddleSlim) behind the accuracy gate")
    from defectkit.demo_ship import compress_and_bundle, edge_run

    ship = compress_and_bundle(out, run.root, lite=lite, overrides=compress_overrides)
    times["compress"] = time.time() - t
    print(f"bundle {ship.bundle} ({' + '.join(ship.shipped)})")

    t = _step("5/6 edge runtime on held-back boards (signed bundle, local collector)")
    edge_loop = edge_run(out, ship.bundle, ship.public_key, holdout_dir / "images")
    print(edge_loop["summary"])
    print(f"the box ran {edge_loop['variant']}: {edge_loop['variant_reason']}")
    preds = Path(edge_loop["predictions"][0])
    edge = verdict_accuracy(preds, holdout_dir / "annotations" / "all.json")
    times["edge"] = time.time() - t

    _step("6/6 report")
    figures = {"line": spec.line, "val": metrics["val"], "best_epoch": metrics.get("best_epoch"),
               "epochs_run": metrics.get("epochs_run"), "stop_reason": metrics.get("stop_reason"),
               "train_minutes": metrics.get("train_minutes"), "export": {k: str(v) for k, v in exported.files.items()},
               "onnx_vs_paddle": agreement.summary(), "edge": edge, "edge_loop": edge_loop,
               "compress": {"table": str(ship.table_md), "variants": ship.variants, "shipped": ship.shipped,
                            "bundle": str(ship.bundle), "public_key": str(ship.public_key)},
               "stage_seconds": {k: round(v, 1) for k, v in times.items()},
               "predictions": str(preds), "curves": str(run.curves_png), "run": str(run.root)}
    from defectkit.report import write_demo_report

    md, js = write_demo_report(out, figures)
    return DemoResult(out, md, js, figures)


def _demo_spec(spec_path: Path) -> Path:
    """The demo's training recipe lives in lines/pcb-demo.yaml; copy its settings onto the generated spec."""
    import yaml

    from edge_runtime.fileio import atomic_write_text

    recipe = Path(__file__).resolve().parent.parent / "lines" / f"{DEMO_LINE}.yaml"
    raw = yaml.safe_load(spec_path.read_text())
    if recipe.is_file():
        ref = yaml.safe_load(recipe.read_text())
        for key in ("image_size", "model_size", "data", "train", "export", "compress", "runtime", "drift", "report"):
            if key in ref:
                raw[key] = ref[key]
        pretrained = (raw.get("train") or {}).get("pretrained")
        if pretrained and "://" not in pretrained and not Path(pretrained).is_absolute():
            raw["train"]["pretrained"] = str((recipe.parent / pretrained).resolve())
        atomic_write_text(spec_path, yaml.safe_dump(raw, sort_keys=False))
    return spec_path


def verdict_accuracy(predictions: Path, ann_file: Path) -> dict[str, Any]:
    """Compare edge verdicts with the truth: a board with any labelled defect should be NG."""
    coco = json.loads(ann_file.read_text())
    defective = {im["file_name"] for im in coco["images"]
                 if any(a["image_id"] == im["id"] for a in coco["annotations"])}
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    tp = fp = tn = fn = 0
    for row in rows:
        truth_ng = Path(row["source"]).name in defective
        said_ng = row.get("verdict") == "NG"
        tp += truth_ng and said_ng
        fn += truth_ng and not said_ng
        fp += said_ng and not truth_ng
        tn += not truth_ng and not said_ng
    n = max(1, len(rows))
    return {"images": len(rows), "verdict_accuracy": (tp + tn) / n, "true_ng": tp, "missed_ng": fn,
            "false_ng": fp, "true_ok": tn}
