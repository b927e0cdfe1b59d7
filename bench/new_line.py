"""A new line's first model: the README path (``data import`` -> ``train``, defaults) vs YOLO11n from scratch.

    python bench/new_line.py                          # 3 lines x 20 min, both cores, ~70 min; table, JSON, PNG
    python bench/new_line.py --minutes 2 --lines a    # a quick one
    python bench/new_line.py --lines b,c --against-kit train.assign_center_radius=0   # kit vs kit (an ablation)

Lines the kit's base never saw (``bench/lines``: no code or texture shared with the pretrain corpora):
a = stone (scikit-image photographs, colour 640x480, COCO), b = strip (line-scan metal, 16-bit grayscale 800x200,
VOC + val.txt), c = weave (textile, colour 512x512, four classes, YOLO). Each is written with the user's own
train/val split. Per line, in one run, at the same time, each pinned to its own core (taskset, one thread):
- kit: ``defectkit data import SRC... --out DIR`` then ``defectkit train DIR/<line>.yaml --name first
  --time-budget-min M`` (the CLI's own override of ``train.time_budget_min``; no spec edit), then
  ``defectkit eval --run`` on the best weights;
- YOLO11n: ``yolo11n.yaml`` (random init, offline) in the bench's own venv, ultralytics' defaults, ``time=M/60``
  hours, ``imgsz`` = the kit spec's input size, on the imported images and split.
``--against-kit KEY=VALUE...`` replaces the YOLO11n arm by a second kit arm trained with those ``--set`` overrides
(arm ``kit_b``): a default measured against its alternative side by side, on the same lines and cores.
Both are scored by the kit's pycocotools evaluator (``detect.evaluate.coco_eval``) on the same val annotations.
images/s = epochs x train images / training seconds (kit: its metrics' train_minutes, evaluation every epoch
inside; YOLO: first to last epoch end, its per-epoch val inside).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import zlib  # noqa: E402,F401  -- before paddle (import-order segfault, STACK.md)


def _in_kit_venv() -> None:
    """Re-run under the kit's venv (scripts/install.sh prints it, creating it if needed) when started by another
    Python: the kit arm calls that venv's ``defectkit`` and the scoring imports ``detect``."""
    import importlib.util

    if not (importlib.util.find_spec("paddle") and importlib.util.find_spec("ppdet")):
        venv = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1]
        python = Path(venv) / "bin" / "python"
        os.execv(str(python), [str(python), *sys.argv])


from bench.lines.bench_venv import bench_python, versions  # noqa: E402
from bench.lines.yolo_data import write_yolo_dataset  # noqa: E402

LINES = {"a": "stone", "b": "strip", "c": "weave"}
ARM_LABELS = {"kit": "kit (README path)", "yolo11n": "YOLO11n from scratch", "kit_b": "kit with --against-kit"}


def run(cmd: list, log: Path, cpu: int | None = None, cwd: Path = REPO) -> float:
    """Run a command (pinned to one core when ``cpu`` is given, one thread), its output appended to ``log``;
    return its CPU seconds (user + system, its waited-for children included); a failure raises with the log's
    tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(log.parent / "ultralytics-config")}
    cmd = [str(c) for c in cmd]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-30:])
        raise RuntimeError(f"{cmd[0] if cpu is None else cmd[3]} failed (exit {proc.returncode}); see {log}:\n{tail}")
    return round(usage.ru_utime + usage.ru_stime, 1)


def kit_arm(spec: Path, work: Path, minutes: float, cpu: int, out: dict, arm: str = "kit",
            overrides: tuple[str, ...] = ()) -> None:
    """The README path after the import: train with defaults (and ``overrides``, ``--set`` each) and the budget,
    then the kit's own eval."""
    dk = Path(sys.executable).parent / "defectkit"
    runs, log = work / ("runs" if arm == "kit" else f"runs-{arm}"), work / f"{arm}.log"
    sets = [a for kv in overrides for a in ("--set", kv)]
    t0 = time.time()
    cpu_s = run([dk, "train", spec, "--name", "first", "--runs", runs, "--time-budget-min", minutes, *sets], log,
                cpu)
    t1 = time.time()
    run_dir = next(runs.glob("*/first"))
    run([dk, "eval", "--run", run_dir, "--out", run_dir / "eval" / "bench"], log, cpu)
    m = json.loads((run_dir / "metrics.json").read_text())
    history = [json.loads(ln) for ln in (run_dir / "history.jsonl").read_text().splitlines() if ln.strip()]
    out.update({"epochs": m["epochs_run"], "train_seconds": round(m["train_minutes"] * 60, 1), "cpu_s": cpu_s,
                "fit_seconds": round(sum(h.get("train_seconds", 0.0) for h in history), 1),
                "best_epoch": m["best_epoch"], "stop_reason": m["stop_reason"], "wall_train_s": round(t1 - t0, 1),
                "wall_eval_s": round(time.time() - t1, 1), "run": str(run_dir),
                "detections": json.loads((run_dir / "eval" / "bench" / "bbox.json").read_text())})


def yolo_arm(py: Path, data: Path, val_map: Path, minutes: float, imgsz: int, work: Path, cpu: int, out: dict) -> None:
    result = work / "yolo_result.json"
    common = [py, "-m", "bench.lines.yolo_arm", "--data", data, "--val-map", val_map, "--minutes", minutes,
              "--imgsz", imgsz, "--project", work / "yolo_runs", "--out", result]
    t0 = time.time()
    cpu_s = run([*common, "--stage", "train"], work / "yolo.log", cpu)
    t1 = time.time()
    run([*common, "--stage", "predict"], work / "yolo.log", cpu)
    out.update(json.loads(result.read_text()))
    out.update({"cpu_s": cpu_s, "wall_train_s": round(t1 - t0, 1), "wall_predict_s": round(time.time() - t1, 1)})


def score(val_json: Path, detections: list[dict]) -> dict:
    from detect.evaluate import coco_eval

    r = coco_eval(val_json, detections).to_dict()
    return {"map50": r["map50"], "map50_95": r["map50_95"], "per_class_ap50": r["per_class_ap50"],
            "detections": r["detections"]}


def one_line(key: str, py: Path, args, root: Path) -> dict:
    """Generate, import, then train both arms side by side; score both."""
    from detect.linespec import LineSpec

    name, work = LINES[key], root / LINES[key]
    work.mkdir(parents=True, exist_ok=True)
    run([py, "-m", "bench.lines.make", "--line", name, "--out", work / "source", "--train", args.train,
                "--val", args.val, "--seed", args.seed], work / "make.log")
    info = json.loads((work / "make.log").read_text().splitlines()[-1])
    dk = Path(sys.executable).parent / "defectkit"
    data_dir = work / "data"
    imp = [dk, "data", "import", *info["import_args"], "--out", data_dir, "--line", name]
    run(imp, work / "import.log")
    import_notes = [ln for ln in (work / "import.log").read_text().splitlines()[1:] if ln.startswith(("note", "warn"))]
    spec = LineSpec.load(data_dir / f"{name}.yaml")
    kit, other = {}, {}
    if args.against_kit:
        other_name = "kit_b"
        second = (kit_arm, data_dir / f"{name}.yaml", work, args.minutes, args.cores[1], other, other_name,
                  tuple(args.against_kit))
    else:
        other_name = "yolo11n"
        data_yaml, val_map = write_yolo_dataset(data_dir, work / "yolo_data")
        (work / "val_map.json").write_text(json.dumps(val_map))
        second = (yolo_arm, py, data_yaml, work / "val_map.json", args.minutes, spec.image_size, work, args.cores[1],
                  other)
    errors: list[BaseException] = []

    def guard(fn, *a):
        try:
            fn(*a)
        except BaseException as exc:  # reported after both finished
            errors.append(exc)

    print(f"== line {key} ({name}): {args.minutes:g} min each, kit on core {args.cores[0]}, {other_name} on core "
          f"{args.cores[1]}", flush=True)
    threads = [threading.Thread(target=guard, args=(kit_arm, data_dir / f"{name}.yaml", work, args.minutes,
                                                    args.cores[0], kit)),
               threading.Thread(target=guard, args=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    n_train = len(json.loads(spec.paths.train.read_text())["images"])
    n_val = len(json.loads(spec.paths.val.read_text())["images"])
    row = {"line": key, "name": name, "classes": spec.classes, "train_images": n_train, "val_images": n_val,
           "import_command": " ".join(str(c) for c in imp[1:]), "import_notes": import_notes,
           "image_size": spec.image_size, "arms": ["kit", other_name]}
    if args.against_kit:
        row["kit_b_overrides"] = list(args.against_kit)
    for arm, res in (("kit", kit), (other_name, other)):
        dets = res.pop("detections")
        res.update(score(spec.paths.val, dets))
        res["images_per_s"] = round(res["epochs"] * n_train / max(1e-9, res["train_seconds"]), 2)
        res["images_per_fit_s"] = round(res["epochs"] * n_train / max(1e-9, res["fit_seconds"]), 2)
        res["images_per_cpu_s"] = round(res["epochs"] * n_train / max(1e-9, res["cpu_s"]), 2)
        row[arm] = res
    return row


def table(rows: list[dict]) -> str:
    out = ["| line | arm | mAP50 | mAP50-95 | per-class AP50 | epochs | train s (eval inside) | images/s | "
           "images/s without eval | CPU s of the train command | images per CPU s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for arm in r.get("arms", ["kit", "yolo11n"]):
            a = r[arm]
            pc = ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in a["per_class_ap50"].items())
            out.append(f"| {r['line']} {r['name']} | {ARM_LABELS[arm]} | "
                       f"{a['map50']:.3f} | {a['map50_95']:.3f} | {pc} | {a['epochs']} | {a['train_seconds']:.0f} | "
                       f"{a['images_per_s']} | {a['images_per_fit_s']} | {a['cpu_s']:.0f} | {a['images_per_cpu_s']} |")
    return "\n".join(out)


def chart(rows: list[dict], path: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    x = np.arange(len(rows))
    for ax, (key, label) in zip(axes, [("map50", "mAP50"), ("map50_95", "mAP50-95"), ("images_per_s", "train images/s")]):
        for k, (arm, colour) in enumerate(zip(rows[0].get("arms", ["kit", "yolo11n"]), ("tab:blue", "tab:orange"))):
            ax.bar(x + (k - 0.5) * 0.38, [r[arm][key] for r in rows], 0.38, color=colour, label=ARM_LABELS[arm])
        ax.set_xticks(x, [f"{r['line']} {r['name']}" for r in rows])
        ax.set_title(label)
        if key != "images_per_s":
            ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"First model on a new line, {minutes:g} min of one core each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget of each arm (20: the kit's default)")
    ap.add_argument("--lines", default="a,b,c", help="comma-separated subset of a (stone), b (strip), c (weave)")
    ap.add_argument("--train", type=int, default=240, help="training images per line (240)")
    ap.add_argument("--val", type=int, default=80, help="validation images per line (80)")
    ap.add_argument("--seed", type=int, default=20261130)
    ap.add_argument("--cores", default="0,1", help="core of the kit, core of YOLO (0,1)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "defectkit" / "bench-new-line")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "new_line.json")
    ap.add_argument("--against-kit", nargs="+", metavar="KEY=VALUE",
                    help="second arm = the kit with these --set overrides instead of YOLO11n (an ablation)")
    args = ap.parse_args()
    _in_kit_venv()
    keys = [k.strip() for k in args.lines.split(",") if k.strip()]
    keys = [next((k for k, v in LINES.items() if v == key), key) for key in keys]
    if not keys or any(k not in LINES for k in keys):
        ap.error(f"--lines takes a subset of {', '.join(f'{k} ({v})' for k, v in LINES.items())}")
    args.cores = [int(c) for c in args.cores.split(",")]
    py = bench_python()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = args.work / stamp
    before, t0 = machine(), time.time()
    rows = [one_line(k, py, args, root) for k in keys]
    after = machine()
    print("\n" + table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": "python bench/new_line.py " + " ".join(sys.argv[1:]), "minutes": args.minutes,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": round(time.time() - t0, 1),
           "work": str(root), "machine": {**before, "loadavg_end": after["loadavg"]},
           "bench_venv": versions(py), "lines": rows}
    args.out.write_text(json.dumps(doc, indent=2))
    chart(rows, args.out.with_suffix(".png"), args.minutes)
    print(f"results: {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
