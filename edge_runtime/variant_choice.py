"""Which variant of a bundle the box runs: each one timed on this box's own CPU, the fastest that passes its
self-test, never one slower than FP32.

Why on the box: INT8 speed depends on the CPU, not on the model. With AVX-512 VNNI, ONNX Runtime's INT8 ran at
~0.55x FP32; on an AVX2-only EPYC the same kind of model ran at 0.94x-1.24x (docs/benchmarks.md "Edge latency",
STACK.md). A bundle may therefore carry FP32 and INT8 (both gated for accuracy by the trainer's gate); at install
the box loads every variant of its backend with its own thread setting, runs the golden self-test on each (a
variant that fails is excluded; FP32 failing refuses the bundle, as before), times them on the golden images
(seeded warm-up, then rounds whose order is shuffled by a seeded generator, so load from other processes falls
on all variants alike), and :func:`decide` picks from the medians. The choice, its reason, the timings and the CPU
flags seen are recorded (:class:`VariantChoice`) in ``state/variant_choice.json`` (reused at the next start while
the bundle, the CPU and the thread count are the same, so a restart neither re-times nor flips), in /healthz and
state/effective_settings.json, and in the report's health (``bundle_variant``).

The thread count is timed too: with ``threads`` above 1 each variant is also timed at 1 thread, and it runs with
the fewest threads unless more are at least :data:`THREAD_GAIN` (20 %) faster (:func:`fewest_threads`). Why: on a
2-core box the core the model leaves free runs the rest of the loop (reading, post-processing, writing), and ONNX
Runtime's INT8 graphs barely use a second thread (PP-YOLOE+ s, AVX-512 VNNI: 12.2 ms at 1 thread, 11.5 at 2, while
FP32 went from 21.0 to 15.5 ms; docs/benchmarks.md "Edge latency"). Variants are then compared each at its own
thread count.

:func:`decide` is pure (timings in, a name and a reason out); the rest is measurement and bookkeeping.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from edge_runtime.errors import UserInputError
from edge_runtime.fileio import atomic_write_json

log = logging.getLogger("defectkit.variant_choice")

BASELINE = "fp32"
MIN_GAIN = 0.05  # a variant must be at least 5 % faster than FP32 (median) to replace it: timing noise is ~2-3 %
# more intra-op threads must cut a variant's median by at least 20 %: a core the model takes is a core the rest of the
# loop (reading, post-processing, writing: ~3 ms CPU a frame) no longer has. Measured on 2 idle cores
# (bench/edge_loop.py, docs/benchmarks.md "Edge loop"): the base tiny FP32 ran alone at 6.7 ms with 2 threads vs
# 8.0 with 1 (0.84x), yet the loop ran 121 frames/s with 2 threads and 122 with 1. ONNX Runtime INT8 (PP-YOLOE+ s):
# 12.2 -> 11.5 ms (0.94x); FP32 21.0 -> 15.5 ms (0.74x: 2 threads)
THREAD_GAIN = 0.2
WARMUP = 3  # calls per variant before timing (first calls allocate and pick kernels)
ROUNDS = 12  # timed calls per variant
SEED = 14
CHOICE_FILE = "variant_choice.json"
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


@dataclass(frozen=True)
class Decision:
    """The variant to run and why (one sentence for logs, /healthz and reports)."""

    variant: str
    reason: str


def decide(medians_ms: Mapping[str, float], baseline: Optional[str], excluded: Mapping[str, str] = {},
           forced: Optional[str] = None, min_gain: float = MIN_GAIN) -> Decision:
    """Pick a variant from median latencies (ms) measured side by side on this CPU.

    ``excluded``: variant -> why it may not run (failed self-test, did not load); never chosen, even when forced.
    ``baseline``: the FP32 variant (None: the bundle has none, the fastest passing variant runs). A variant
    replaces the baseline only when its median is at most ``1 - min_gain`` of the baseline's: never one slower
    than FP32, and not one within the noise of it. ``forced`` (the box's ``--variant``) wins over timing when it
    passed; otherwise the automatic choice runs and the reason says why the override was not honoured."""
    usable = {k: float(v) for k, v in medians_ms.items() if k not in excluded}
    if not usable:
        raise ValueError(f"no variant passed: {dict(excluded) or 'nothing was timed'}")
    note = ""
    if forced is not None:
        if forced in usable:
            ms = usable[forced]
            rel = f", {ms / usable[baseline]:.2f}x {baseline}" if baseline in usable and forced != baseline else ""
            return Decision(forced, f"{forced} forced by the box's --variant ({ms:.1f} ms median{rel})")
        why = excluded.get(forced) or f"not in this bundle (it has {', '.join(sorted(medians_ms))})"
        note = f"; --variant {forced} not honoured: {why}"
    if baseline is not None and baseline not in usable:
        raise ValueError(f"the {baseline} variant cannot run: {excluded.get(baseline, 'not timed')}")
    best = min(usable, key=lambda k: (usable[k], k != baseline, k))
    if baseline is None:
        return Decision(best, f"{best} fastest ({_ms(usable)}); the bundle has no {BASELINE} variant{note}")
    base_ms = usable[baseline]
    if best == baseline:
        return Decision(baseline, f"{baseline} fastest on this CPU ({_ms(usable)}){note}")
    ratio = usable[best] / base_ms if base_ms > 0 else 1.0
    if ratio > 1.0 - min_gain:
        return Decision(baseline, f"{best} is {ratio:.2f}x {baseline}, not at most {1 - min_gain:.2f}x: {baseline} runs "
                                  f"({_ms(usable)}){note}")
    return Decision(best, f"{best} is {ratio:.2f}x {baseline} on this CPU ({_ms(usable)}){note}")


def fewest_threads(medians_by_threads: Mapping[int, float], min_gain: float = THREAD_GAIN) -> int:
    """The thread count a variant runs with, from its median latency (ms) per thread count measured side by side:
    the fewest, unless more threads are at least ``min_gain`` faster (a core the model does not need is a core for
    the rest of the loop)."""
    if not medians_by_threads:
        raise ValueError("nothing was timed")
    counts = sorted(medians_by_threads)
    best = counts[0]
    for t in counts[1:]:
        if medians_by_threads[t] <= (1.0 - min_gain) * medians_by_threads[best]:
            best = t
    return best


def _ms(medians: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(medians.items(), key=lambda kv: kv[1]))


def median_ms(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {k: round(statistics.median(v), 3) for k, v in times.items() if v}


def time_interleaved(runners: Mapping[str, Callable[[int], Any]], warmup: int = WARMUP, rounds: int = ROUNDS,
                     seed: int = SEED) -> dict[str, list[float]]:
    """Wall times (ms) of ``rounds`` calls of each runner (called with the round number, e.g. to cycle images).
    Every round calls each runner once, in an order shuffled by a seeded generator, so a burst of load from another
    process falls on all variants alike; ``warmup`` untimed calls each first, in the same kind of order."""
    rng = random.Random(seed)
    names = sorted(runners)
    for i in range(warmup):
        for k in rng.sample(names, len(names)):
            runners[k](i)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(rounds):
        for k in rng.sample(names, len(names)):
            t0 = time.perf_counter()
            runners[k](i)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def cpu_features() -> dict[str, Any]:
    """This CPU's model name and the SIMD flags that decide INT8 speed (``/proc/cpuinfo``; empty elsewhere)."""
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        pass
    lines = text.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith(("model name", "hardware"))),
                 platform.processor() or platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith(("flags", "Features"))), []))
    return {"model": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "flags": {f: f in flags for f in CPU_FLAGS}}


@dataclass
class VariantChoice:
    """What the box chose for one bundle version, and everything that explains it."""

    version: str
    backend: str
    variant: str
    model_file: str
    reason: str
    threads: int
    medians_ms: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    excluded: dict[str, str] = field(default_factory=dict)  # variant -> why it may not run here
    files: dict[str, str] = field(default_factory=dict)  # variant -> sha256 of its model (what was timed)
    forced: Optional[str] = None
    cpu: dict[str, Any] = field(default_factory=dict)
    measured: str = ""  # UTC time of the measurement
    run_threads: int = 0  # the threads the chosen variant runs with (fewest_threads); 0 = ``threads`` (older files)
    thread_medians_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> {threads: median ms}

    @property
    def inference_threads(self) -> int:
        """The intra-op threads the box runs the chosen variant with."""
        return self.run_threads or self.threads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        flags = self.cpu.get("flags", {})
        seen = ", ".join(f for f in ("avx512_vnni", "avx_vnni", "avx2") if flags.get(f)) or "no avx2/vnni"
        return f"variant {self.variant}: {self.reason}; {self.inference_threads} of {self.threads} threads; CPU {seen}"

    def fits(self, version: str, backend: str, threads: int, files: Mapping[str, str], forced: Optional[str],
             cpu: Mapping[str, Any]) -> bool:
        """Still valid for this load: same bundle version, models, backend, threads, override and CPU."""
        return (self.version, self.backend, self.threads, self.files, self.forced, self.cpu) == (
            version, backend, threads, dict(files), forced, dict(cpu))


def load_choices(state_dir: Path) -> dict[str, VariantChoice]:
    """The recorded choices by bundle version (a damaged file counts as none: the box times again)."""
    path = Path(state_dir) / CHOICE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {v: VariantChoice(**c) for v, c in raw.get("choices", {}).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("%s is unreadable (%s): the variants will be timed again", path, exc)
        return {}


def save_choice(state_dir: Path, choice: VariantChoice, keep: Sequence[str] = ()) -> Path:
    """Record ``choice`` (atomically), keeping only the versions in ``keep`` besides it."""
    choices = {v: c for v, c in load_choices(state_dir).items() if v in keep}
    choices[choice.version] = choice
    return atomic_write_json(Path(state_dir) / CHOICE_FILE,
                             {"schema": "defectkit.variant-choice/1", "current": choice.version,
                              "choices": {v: c.to_dict() for v, c in choices.items()}})


def health_fields(choice: Optional[VariantChoice]) -> dict[str, Any]:
    """The report health's variant keys (scalars, as the wire schema's health takes): the variant, its median
    latency relative to FP32 here, and whether this CPU has VNNI."""
    if choice is None:
        return {}
    flags = choice.cpu.get("flags", {})
    out: dict[str, Any] = {"bundle_variant": choice.variant,
                           "cpu_vnni": bool(flags.get("avx512_vnni") or flags.get("avx_vnni"))}
    med = choice.medians_ms
    if choice.variant in med and BASELINE in med and med[BASELINE] > 0:
        out["bundle_variant_vs_fp32"] = round(med[choice.variant] / med[BASELINE], 3)
    return out


def check_forced(name: Optional[str]) -> Optional[str]:
    """The ``--variant`` option: a variant name or None."""
    import re

    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", str(name)):
        raise UserInputError(f"--variant {name!r} is not a variant name (e.g. fp32, ort-int8)")
    return name


__all__ = ["Decision", "decide", "fewest_threads", "time_interleaved", "median_ms", "cpu_features", "VariantChoice",
           "load_choices", "save_choice", "check_forced", "health_fields", "BASELINE", "MIN_GAIN", "THREAD_GAIN"]
