"""What drift monitoring costs per frame, next to a typical inference time.

Times ``frame_features`` (on a decoded 320 x 320 board frame) and ``DriftMonitor.update`` (a ring-buffer
write, plus a full window evaluation every ``eval_every`` frames) over a stream of synthetic frames, and
prints the per-frame cost as a share of the inference time (default 30 ms: ONNX Runtime FP32,
PP-YOLOE+ s, 320 px, 2 threads on the development machine). The issue's budget is 3 % for drift plus
reporting together.

    python bench/drift_cost.py [--frames 2000] [--infer-ms 30] [--size 320] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from edge_runtime.drift import DriftMonitor, build_reference, frame_features  # noqa: E402
from edge_runtime.drift.synthetic import BoardStream, synthetic_features  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2000, help="frames timed (default 2000)")
    ap.add_argument("--infer-ms", type=float, default=30.0, help="inference time per frame to compare with (ms)")
    ap.add_argument("--size", type=int, default=320, help="side of the decoded frame (px)")
    ap.add_argument("--threads", type=int, default=0, help="cv2.setNumThreads (0 = OpenCV's default)")
    args = ap.parse_args(argv)
    if args.threads:
        cv2.setNumThreads(args.threads)

    t0 = time.perf_counter()
    reference = build_reference(synthetic_features(500, seed=1, size=args.size), class_names=["spot", "scratch", "stain"])
    print(f"reference: 500 frames in {time.perf_counter() - t0:.1f} s, "
          f"{len(reference.continuous)} continuous + {len(reference.categorical)} categorical features")
    stream = BoardStream(seed=2, size=args.size)
    frames = [stream.next() for _ in range(200)]  # decoded frames, reused cyclically
    monitor = DriftMonitor(reference)
    s = monitor.settings

    feat_t, upd_t, eval_t = [], [], []
    for i in range(args.frames):
        f = frames[i % len(frames)]
        a = time.perf_counter()
        feats = frame_features(f.image, f.scores, f.class_ids, 3, f.ng)
        b = time.perf_counter()
        evaluates = monitor._count + 1 >= s.min_frames and (monitor.frames + 1) % s.eval_every == 0
        monitor.update(feats)
        c = time.perf_counter()
        feat_t.append((b - a) * 1e3)
        (eval_t if evaluates else upd_t).append((c - b) * 1e3)

    per_frame = (sum(feat_t) + sum(upd_t) + sum(eval_t)) / args.frames
    print(f"frames timed: {args.frames} at {args.size} x {args.size}; window {s.window}, evaluation every {s.eval_every} frames")
    print(f"frame_features      median {statistics.median(feat_t):.3f} ms  p99 {_pct(feat_t, 99):.3f} ms")
    print(f"update (no eval)    median {statistics.median(upd_t) * 1e3:.1f} us")
    print(f"update (evaluates)  median {statistics.median(eval_t):.3f} ms  max {max(eval_t):.3f} ms  ({len(eval_t)} evaluations)")
    print(f"drift per frame (mean, evaluations amortised): {per_frame:.3f} ms")
    print(f"ratio to {args.infer_ms:.0f} ms inference: {100 * per_frame / args.infer_ms:.2f} %  (budget 3 % with reporting)")
    print(f"final state: {monitor.state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
