"""Where ONNX Runtime spends an inference: per op type, FP32 against INT8 recipes, from ORT's own profiler.

    python bench/ort_profile.py [--work DIR] [--runs N] [--threads T]

Reads the variants ``bench/edge_latency.py`` built in ``--work`` (its ``variants.json``; run that first) and
profiles every ONNX Runtime model there (FP32, INT8 recipes) with ``SessionOptions.enable_profiling`` under the edge
backend's own session options (``--threads`` intra-op threads, sequential, no spinning, all graph optimizations),
runs interleaved between the models in a seeded order so load from other processes falls on all of them. Kernel
times are summed per op type and per group (int8 convs, FP32 convs, quantize/dequantize, int8 element-wise, FP32
activations, layout, rest) and divided by the number of timed runs. Writes ``bench/results/ort_profile.json`` and
prints the tables; ``bench/edge_latency.py`` embeds the same figures in docs/benchmarks.md "Edge latency".

The profiler adds a little time per node; the shares, not the absolute milliseconds, are the finding.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = {
    "int8 conv": ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"),
    "FP32 conv": ("Conv", "FusedConv", "NchwcConv"),
    "quantize / dequantize": ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"),
    "int8 element-wise": ("QLinearSigmoid", "QLinearMul", "QLinearAdd", "QLinearConcat", "QLinearAveragePool",
                          "QLinearGlobalAveragePool", "QLinearLeakyRelu", "NhwcMaxPool", "QLinearSoftmax"),
    "FP32 activations / element-wise": ("Sigmoid", "Mul", "Add", "QuickGelu", "Div", "Sub", "Relu", "HardSigmoid"),
    "layout (reorder, transpose, reshape, concat)": ("ReorderInput", "ReorderOutput", "Transpose", "Reshape",
                                                     "Concat", "Squeeze", "Unsqueeze", "Split", "Slice"),
}


def group_of(op: str) -> str:
    return next((g for g, ops in GROUPS.items() if op in ops), "rest (softmax, pooling, reduce, resize)")


def profile_models(models: dict[str, str], feeds: list[dict[str, Any]], threads: int = 2, runs: int = 40,
                   warmup: int = 5, seed: int = 0) -> dict[str, Any]:
    """Per model: mean ms per run of each op type (kernel time), of each group, of the whole run; top nodes."""
    import onnxruntime as ort

    tmp = Path(tempfile.mkdtemp(prefix="defectkit-ortprof-"))
    sessions = {}
    for name, path in models.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(tmp / name.replace("/", "_"))
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = [i.name for i in s.get_inputs()]
        sessions[name] = (s, [{n: f[n] for n in names} for f in feeds])
    rng = random.Random(seed)
    for i in range(warmup + runs):
        for name in rng.sample(sorted(sessions), len(sessions)):
            s, fs = sessions[name]
            s.run(None, fs[i % len(fs)])
    out: dict[str, Any] = {}
    for name, (s, _) in sessions.items():
        events = json.loads(Path(s.end_profiling()).read_text())
        model_runs = [e for e in events if e.get("name") == "model_run"]
        timed = model_runs[warmup:]
        start = timed[0]["ts"]
        by_op: Counter = Counter()
        by_node: Counter = Counter()
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
                continue
            op = e["args"].get("op_name", "?")
            by_op[op] += e["dur"]
            by_node[(e["name"][: -len("_kernel_time")], op)] += e["dur"]
        n = len(timed)
        ops = {k: round(v / n / 1e3, 3) for k, v in by_op.most_common()}
        groups: Counter = Counter()
        for op, ms in ops.items():
            groups[group_of(op)] += ms
        out[name] = {"run_ms": round(sum(e["dur"] for e in timed) / n / 1e3, 3),
                     "kernel_ms": round(sum(ops.values()), 3), "ops_ms": ops,
                     "groups_ms": {k: round(v, 3) for k, v in groups.most_common()},
                     "top_nodes": [{"node": k[0], "op": k[1], "ms": round(v / n / 1e3, 3)}
                                   for k, v in by_node.most_common(12)],
                     "runs": n}
    return {"threads": threads, "runs": runs, "warmup": warmup, "models": out}


def markdown(prof: dict[str, Any]) -> str:
    """One table: per group, ms per run and share of the kernel time, for every profiled model."""
    names = list(prof["models"])
    groups = list(GROUPS) + ["rest (softmax, pooling, reduce, resize)"]
    head = "| op group | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    for g in groups:
        cells = []
        for n in names:
            m = prof["models"][n]
            ms = m["groups_ms"].get(g, 0.0)
            cells.append(f"{ms:.1f} ({100 * ms / m['kernel_ms']:.0f} %)" if ms else "—")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines.append("| **all kernels** | " + " | ".join(f"**{prof['models'][n]['kernel_ms']:.1f}**" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/defectkit-edge-latency"), help="bench/edge_latency.py's --work")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    info = json.loads((a.work / "variants.json").read_text())
    models = {k.split("/", 1)[1]: v for k, v in info["models"].items() if k.startswith("onnxruntime/")}
    feeds = image_feeds(models[next(iter(models))], info["images"][:4])
    prof = profile_models(models, feeds, a.threads, a.runs)
    out = ROOT / "bench" / "results" / "ort_profile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof, indent=1))
    print(markdown(prof))
    for n, m in prof["models"].items():
        print(f"\n{n}: top nodes " + ", ".join(f"{t['node']} ({t['op']}) {t['ms']:.2f}" for t in m["top_nodes"][:6]))
    print(f"\nresults: {out}")
    return 0


def image_feeds(model: str, images: list[str]) -> list[dict[str, Any]]:
    """The edge runtime's feeds of ``images`` for ``model`` (its deploy.json beside it)."""
    import cv2

    from edge_runtime.predict import Detector

    det = Detector.from_model(model, backend="onnxruntime", threads=1)
    return [det.prepare(cv2.imread(p, cv2.IMREAD_COLOR)) for p in images]


if __name__ == "__main__":
    sys.exit(main())
