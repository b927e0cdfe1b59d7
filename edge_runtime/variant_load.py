"""Load a verified bundle's variants for one backend, self-test each, time them, keep the chosen one.

The bundle manager calls :func:`load_variants` when it loads a bundle (at install, at start, before a swap). A
bundle with one model for the backend is loaded and self-tested as before, and timed only for its thread count
(below). With several variants (``ModelEntry.variant``: fp32, ort-int8, ...) each is loaded with the box's thread
setting; the golden self-test runs on all of them; a variant that does not load or fails its self-test is excluded
(its failures leave the report and are listed in ``skipped``), except the FP32 baseline, whose failure still
refuses the bundle (the golden expectations come from it: when it fails, the runtime itself is suspect). The
survivors are timed on the golden images and :func:`edge_runtime.variant_choice.decide` picks one; the choice is
recorded in the state directory and reused while the bundle, the CPU, the backend, the thread count and the
override are unchanged.

With a thread setting above 1 (and a backend that applies it), every surviving variant, a bundle's only one too, is
also loaded and timed at 1 thread, in the same interleaved rounds; each runs with the fewest threads unless more are
:data:`THREAD_GAIN` faster (:func:`edge_runtime.variant_choice.fewest_threads`), and the variants are compared each
at its own thread count. The self-test runs at the configured thread count only (thread count changes the order of
float sums, not what the model detects).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from edge_runtime.bundle import Manifest, ModelEntry
from edge_runtime.errors import BundleError
from edge_runtime.predict import Detector
from edge_runtime.selftest import SelfTestReport, Tolerance, bundle_detector, read_golden, runnable_models, self_test
from edge_runtime.variant_choice import (BASELINE, THREAD_GAIN, VariantChoice, cpu_features, decide, fewest_threads,
                                         load_choices, median_ms, save_choice, time_interleaved)

log = logging.getLogger("defectkit.variant_choice")


def variant_name(model: ModelEntry) -> str:
    """The model's variant (manifest ``variant``); a bundle built before the field: its file name's stem."""
    return model.variant or Path(model.file).stem


def candidates(manifest: Manifest, backend: str) -> dict[str, ModelEntry]:
    """The models ``backend`` can run here, by variant, in manifest order (one per variant: the first)."""
    out: dict[str, ModelEntry] = {}
    for name, model in runnable_models(manifest):
        if name == backend:
            out.setdefault(variant_name(model), model)
    return out


def baseline_of(cands: dict[str, ModelEntry]) -> Optional[str]:
    """The FP32 reference: the variant named fp32, else the first FP32-precision one, else none."""
    if BASELINE in cands:
        return BASELINE
    return next((k for k, m in cands.items() if m.precision == "fp32"), None)


def _label(det: Detector) -> str:
    return f"{det.backend.name}:{det.model_path.name}"


def _without(report: SelfTestReport, excluded: dict[str, tuple[str, str]]) -> SelfTestReport:
    """The report with the excluded variants' results moved to ``skipped`` (label -> (file, why))."""
    labels = set(excluded)
    skipped = dict(report.skipped)
    for label, (file, why) in excluded.items():
        skipped[file] = why
    return replace(report, results=[r for r in report.results if r.backend not in labels],
                   backends=[b for b in report.backends if b not in labels], skipped=skipped)


def load_variants(manifest: Manifest, backend: str, threads: int, *, state_dir: Path,
                  tolerance: Optional[Tolerance] = None, selftest_backends: Optional[Sequence[str]] = None,
                  forced: Optional[str] = None, keep_versions: Sequence[Optional[str]] = ()
                  ) -> tuple[Detector, SelfTestReport, VariantChoice]:
    """(the detector to inspect with, the self-test report, the choice). The caller refuses the bundle when the
    report is not ok (the chosen variant and every other backend's model must pass; excluded variants do not count).
    """
    cands = candidates(manifest, backend)
    if not cands:
        raise BundleError(f"bundle {manifest.version} has no model that {backend} runs here")
    baseline = baseline_of(cands)
    cpu = cpu_features()
    files = {k: m.sha256 for k, m in cands.items()}
    dets: dict[str, Detector] = {}
    excluded: dict[str, str] = {}
    for name, model in cands.items():
        try:
            dets[name] = bundle_detector(manifest, model, backend, threads)
        except Exception as exc:  # a variant that does not load is excluded; the baseline's failure refuses
            if len(cands) == 1 or name == baseline:
                raise
            excluded[name] = f"cannot load: {exc}"
    report = self_test(manifest, list(dets.values()), threads=1, tolerance=tolerance, backends=selftest_backends)
    dropped: dict[str, tuple[str, str]] = {}
    if len(cands) > 1:
        for name, det in dets.items():
            bad = [r for r in report.results if r.backend == _label(det) and not r.ok]
            if bad and name != baseline:
                excluded[name] = f"self-test failed: {bad[0].image}: {bad[0].problems[0]}"
                dropped[_label(det)] = (cands[name].file, f"variant {name} excluded: {excluded[name]}")
        report = _without(report, dropped)
        for name in excluded:
            dets.pop(name, None)  # its session is released; it is neither timed nor run
    base = VariantChoice(version=manifest.version, backend=backend, variant="", model_file="", reason="",
                         threads=threads, excluded=dict(excluded), files=files, forced=forced, cpu=cpu,
                         measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if not report.ok:
        return next(iter(dets.values())), report, base  # the caller refuses the bundle with the report's line
    only_why = None
    if len(dets) == 1:
        only = next(iter(dets))
        only_why = (f"the only {backend} variant of the bundle" if len(cands) == 1 else
                    f"the only {backend} variant that passed ({'; '.join(f'{k}: {v}' for k, v in excluded.items())})")
        if forced is not None and forced != only:
            only_why += f"; --variant {forced} not honoured: {excluded.get(forced, 'not in this bundle')}"
        if len(thread_counts(dets, threads)) == 1:  # nothing to time: one variant, one thread count
            return dets[only], report, replace(base, variant=only, model_file=cands[only].file, reason=only_why)
    cached = load_choices(state_dir).get(manifest.version)
    if cached is not None and cached.fits(manifest.version, backend, threads, files, forced, cpu) \
            and cached.variant in dets and cached.excluded == excluded:
        log.info("variant choice of %s reused from %s: %s", manifest.version, state_dir, cached.line())
        choice = cached
        chosen = dets[cached.variant]
        if cached.inference_threads != threads:
            chosen = bundle_detector(manifest, cands[cached.variant], backend, cached.inference_threads)
    else:
        images = [img for _, img, _ in read_golden(manifest)]
        fields, chosen = timed_choice(dets, threads, images,
                                      lambda name, t: bundle_detector(manifest, cands[name], backend, t),
                                      baseline, excluded, forced, only_why)
        choice = replace(base, model_file=cands[fields["variant"]].file, **fields)
        save_choice(state_dir, choice, keep=[v for v in keep_versions if v])
        log.info("bundle %s: %s", manifest.version, choice.line())
    dets.clear()  # the other sessions are released with their last reference
    return chosen, report, choice


def thread_counts(dets: dict[str, Detector], threads: int) -> list[int]:
    """The thread counts to time: the configured one, and 1 when it is larger and the backend applies a thread
    setting (Paddle Lite's x86 wheels have none: both counts would time the same thing)."""
    settable = all(d.backend.threads_settable for d in dets.values())
    return sorted({threads, 1}) if threads > 1 and settable else [threads]


def timed_choice(dets: dict[str, Detector], threads: int, images: Sequence, reload: Callable[[str, int], Detector],
                 baseline: Optional[str], excluded: Mapping[str, str] = {}, forced: Optional[str] = None,
                 only_why: Optional[str] = None) -> tuple[dict, Detector]:
    """Time every variant of ``dets`` (loaded at ``threads``) at every thread count of :func:`thread_counts`
    (``reload(name, t)`` loads the others), on ``images``, interleaved; give each variant its thread count, decide
    between them. Returns (the :class:`VariantChoice` fields that come from the measurement, the chosen variant's
    detector at its thread count). ``only_why``: one variant only, and why (its reason then, with the threads).
    Also what bench/edge_latency.py reports as the box's own choice."""
    counts = thread_counts(dets, threads)
    runs = {f"{name}@{t}": det if t == threads else reload(name, t) for name, det in dets.items() for t in counts}
    times = time_variants(images, runs)
    by_run = median_ms(times)
    per_threads = {name: {t: by_run[f"{name}@{t}"] for t in counts} for name in dets}
    run_threads = {name: fewest_threads(ms) for name, ms in per_threads.items()}
    medians = {name: per_threads[name][run_threads[name]] for name in dets}
    d = decide(medians, baseline, excluded, forced)
    reason = only_why or d.reason
    if len(counts) > 1:
        at = " / ".join(str(t) for t in counts)
        reason += "; threads: " + ", ".join(
            f"{name} {run_threads[name]} ({' / '.join(f'{ms:.1f}' for _, ms in sorted(per_threads[name].items()))} ms "
            f"at {at})" for name in sorted(dets)) + f", each the fewest unless more are {THREAD_GAIN:.0%} faster"
    fields = {"variant": d.variant, "reason": reason, "medians_ms": medians,
              "samples": min(len(t) for t in times.values()), "run_threads": run_threads[d.variant],
              "thread_medians_ms": {name: {str(t): ms for t, ms in sorted(v.items())}
                                    for name, v in per_threads.items()}}
    return fields, runs[f"{d.variant}@{run_threads[d.variant]}"]


def time_variants(images: Sequence, dets: Mapping[str, Detector]) -> dict[str, list[float]]:
    """Inference times (ms) of each loaded detector on ``images`` (e.g. the bundle's golden images; prepared once
    each)."""
    feeds = {k: [d.prepare(img) for img in images] for k, d in dets.items()}
    runners = {k: (lambda i, d=d, f=feeds[k]: d.infer(f[i % len(f)])) for k, d in dets.items()}
    return time_interleaved(runners)


__all__ = ["load_variants", "candidates", "baseline_of", "variant_name", "time_variants", "timed_choice",
           "thread_counts"]
