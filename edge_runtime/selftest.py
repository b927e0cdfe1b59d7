"""Golden-image self-test: every backend this box can run gives the detections the bundle expects.

A bundle ships golden images with the detections its parent model gave on them
(``golden/NN-<image>.expected.json``). At every start and before every model swap the runtime runs each
golden image through each model of the bundle that an installed backend can run here, and compares the
result with the expected detections. A backend that disagrees (a wrong runtime version, a broken
conversion, a damaged library) stops the start or the update before it inspects a single part.

Expected-output file (``defectkit.golden/1``; :func:`expected_record` writes it)::

    {"schema": "defectkit.golden/1", "detections": [{"class_id": 0, "class": "short", "score": 0.91,
                                                     "box": [x1, y1, x2, y2]}, ...]}

The bbox-row form ``{"boxes": [[class, score, x1, y1, x2, y2], ...]}`` of an NMS export is read too.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np

from edge_runtime.backends import BACKENDS, create_backend, is_available
from edge_runtime.bundle import Manifest
from edge_runtime.bundle import ModelEntry as BundleModel
from edge_runtime.errors import BundleError, ModelError, UserInputError
from edge_runtime.modelspec import ModelEntry, ModelSpec
from edge_runtime.postprocess import Detections
from edge_runtime.predict import Detector

log = logging.getLogger("defectkit.selftest")

SCHEMA = "defectkit.golden/1"


@dataclass(frozen=True)
class Tolerance:
    """How close a backend must come to the expected detections.

    Detections scoring below ``min_score`` on both sides are not compared (low-score NMS leftovers reorder
    between runtimes); one present on one side only is tolerated while its score is below
    ``min_score + score``. Boxes may differ by ``box_px`` pixels or ``box_rel`` of the box side, whichever
    is larger (INT8 models move boxes a little)."""

    score: float = 0.05
    box_px: float = 2.0
    box_rel: float = 0.05
    min_score: float = 0.3


@dataclass
class GoldenResult:
    """One golden image on one backend: ``problems`` is empty when it matched."""

    backend: str
    image: str
    expected: int
    got: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class SelfTestReport:
    """The outcome over all backends and golden images; ``line()`` is what the log and the report show."""

    version: str
    results: list[GoldenResult] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # model file -> why it was not tested
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def failures(self) -> list[GoldenResult]:
        return [r for r in self.results if not r.ok]

    def line(self) -> str:
        if not self.results:
            return f"self-test of bundle {self.version}: nothing was tested ({'; '.join(self.skipped.values()) or 'no golden images'})"
        bad = self.failures()
        head = (f"self-test of bundle {self.version}: {len(self.results) - len(bad)}/{len(self.results)} golden "
                f"checks passed on {', '.join(self.backends)} in {self.seconds:.1f} s")
        if bad:
            head += "; " + "; ".join(f"{r.backend} on {r.image}: {r.problems[0]}" for r in bad[:3])
        return head


def expected_record(dets: Detections, classes: Sequence[str]) -> dict[str, Any]:
    """The expected-output JSON of one golden image (what the bundle builder writes beside it)."""
    return {"schema": SCHEMA, "detections": dets.to_records(classes)}


def parse_expected(raw: Any, classes: Sequence[str], where: str) -> Detections:
    """Expected detections from either form; BundleError naming the file on anything malformed."""
    try:
        if isinstance(raw, Mapping) and "detections" in raw:
            recs = raw["detections"]
            boxes = [[float(v) for v in r["box"]] for r in recs]
            scores = [float(r["score"]) for r in recs]
            ids = [int(r["class_id"]) if "class_id" in r else list(classes).index(r["class"]) for r in recs]
        elif isinstance(raw, Mapping) and "boxes" in raw:
            rows = [[float(v) for v in row] for row in raw["boxes"]]
            if any(len(r) != 6 for r in rows):
                raise ValueError("each row of 'boxes' must be [class, score, x1, y1, x2, y2]")
            ids = [int(r[0]) for r in rows]
            scores = [r[1] for r in rows]
            boxes = [r[2:] for r in rows]
        else:
            raise ValueError("expected an object with 'detections' (defectkit.golden/1) or 'boxes' rows")
        if any(len(b) != 4 for b in boxes):
            raise ValueError("every box must be [x1, y1, x2, y2]")
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{where}: golden expected output is malformed ({exc}); rebuild the bundle") from None
    bad = [i for i in ids if not 0 <= i < len(classes)]
    if bad:
        raise BundleError(f"{where}: golden class id {bad[0]} is outside the bundle's {len(classes)} classes")
    return Detections.build(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                            np.array(ids, np.int64))


def _box_close(a: np.ndarray, b: np.ndarray, tol: Tolerance) -> bool:
    side = max(float(b[2] - b[0]), float(b[3] - b[1]), 1.0)
    return bool(np.all(np.abs(a - b) <= max(tol.box_px, tol.box_rel * side)))


def compare(expected: Detections, got: Detections, tol: Tolerance) -> list[str]:
    """What differs between two detection sets (empty = same within tolerance). Greedy matching per
    expected detection, best score first: same class, box close, score close."""
    problems: list[str] = []
    used = np.zeros(len(got), dtype=bool)
    for i in range(len(expected)):
        e_box, e_score, e_cls = expected.boxes[i], float(expected.scores[i]), int(expected.class_ids[i])
        match = -1
        for j in range(len(got)):
            if used[j] or int(got.class_ids[j]) != e_cls or not _box_close(got.boxes[j], e_box, tol):
                continue
            if abs(float(got.scores[j]) - e_score) <= tol.score:
                match = j
                break
        if match >= 0:
            used[match] = True
        elif e_score >= tol.min_score:
            problems.append(f"expected class {e_cls} score {e_score:.3f} at {np.round(e_box, 1).tolist()} is missing")
    for j in np.flatnonzero(~used):
        score = float(got.scores[j])
        if score >= tol.min_score + tol.score:
            problems.append(f"unexpected class {int(got.class_ids[j])} score {score:.3f} at "
                            f"{np.round(got.boxes[j], 1).tolist()}")
    return problems


# ------------------------------------------------------------------------------------------ loading a bundle


def _host_target() -> str:
    return "arm" if platform.machine().lower().startswith(("arm", "aarch")) else "x86"


def _spec_entry(model: BundleModel) -> ModelEntry:
    return ModelEntry(file=Path(model.file).name, format=model.format, target=model.target, precision=model.precision,
                      nms=model.nms, runtime_version=model.runtime_version, sha256=model.sha256)


def model_spec(manifest: Manifest) -> ModelSpec:
    """The bundle's models as a deploy.json description (what :class:`Detector` takes)."""
    return ModelSpec(line=manifest.line, classes=list(manifest.classes), input=manifest.input,
                     models=[_spec_entry(m) for m in manifest.models], postprocess=manifest.postprocess)


def runnable_models(manifest: Manifest) -> list[tuple[str, BundleModel]]:
    """(backend, model) pairs this machine can run, in manifest order: installed backend, matching target."""
    host = _host_target()
    out = []
    for m in manifest.models:
        if m.target not in (host, "any"):
            continue
        for name, info in BACKENDS.items():
            if m.format in info.formats and is_available(name):
                out.append((name, m))
                break
    return out


def bundle_detector(manifest: Manifest, model: BundleModel, backend: str, threads: int = 2) -> Detector:
    """A :class:`Detector` for one model of a verified bundle (checksums were checked by verify_bundle)."""
    if threads < 1:
        raise UserInputError(f"threads must be at least 1, got {threads}.")
    path = manifest.path(model.file)
    adapter = create_backend(backend)
    if backend == "paddlelite" and hasattr(adapter, "expected_version"):
        adapter.expected_version = model.runtime_version  # the version the manifest records for this .nb
    adapter.load(path, threads)
    log.info("loaded %s %s with %s %s (%d threads)", manifest.version, model.file, backend, adapter.version(), threads)
    spec = model_spec(manifest)
    return Detector(spec, spec.find(path.name), adapter, path)


def choose_model(manifest: Manifest, backend: str | None = None) -> tuple[str, BundleModel]:
    """The (backend, model) the runtime inspects with: ``backend`` if given, else the first runnable one."""
    runnable = runnable_models(manifest)
    if backend is not None:
        if backend not in BACKENDS:
            create_backend(backend)  # raises the "unknown backend, did you mean" ConfigError
        for name, m in runnable:
            if name == backend:
                return name, m
        have = ", ".join(f"{m.format}/{m.target}" for m in manifest.models)
        why = "is not installed" if not is_available(backend) else f"has no model in this bundle (it has {have})"
        raise ModelError(f"backend '{backend}' {why}: bundle {manifest.line} {manifest.version} cannot run with it. "
                         f"Runnable here: {', '.join(n for n, _ in runnable) or 'none'}.")
    if not runnable:
        have = ", ".join(f"{m.format}/{m.target}" for m in manifest.models)
        raise ModelError(f"no installed backend on this {_host_target()} machine runs a model of bundle "
                         f"{manifest.line} {manifest.version} (it has {have}); install onnxruntime or paddlelite")
    return runnable[0]


def read_golden(manifest: Manifest) -> list[tuple[str, np.ndarray, Detections]]:
    """(name, decoded image, expected detections) of every golden image of the bundle."""
    out = []
    for g in manifest.golden:
        path = manifest.path(g.file)
        image = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise BundleError(f"golden image {g.file} of bundle {manifest.version} cannot be decoded; rebuild the bundle")
        exp_path = manifest.path(g.expected.file)
        try:
            raw = json.loads(exp_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleError(f"{exp_path}: golden expected output is not readable JSON ({exc})") from None
        out.append((g.file, image, parse_expected(raw, manifest.classes, str(exp_path))))
    return out


def _label(det: Detector) -> str:
    return f"{det.backend.name}:{det.model_path.name}"


def self_test(manifest: Manifest, detectors: Sequence[Detector] = (), threads: int = 1,
              tolerance: Tolerance | None = None, backends: Iterable[str] | None = None) -> SelfTestReport:
    """Run the golden images through ``detectors`` (already loaded, e.g. the candidate of an update) and
    through every other runnable model of the bundle (loaded here, released after). Never raises for a
    failing backend: the failure is in the report. ``backends`` limits which backends are loaded here."""
    tol = tolerance or (Tolerance(**manifest.golden_tolerance) if manifest.golden_tolerance else Tolerance())
    t0 = time.perf_counter()
    report = SelfTestReport(version=manifest.version)
    golden = read_golden(manifest)
    if not golden:
        report.skipped["golden"] = (f"bundle {manifest.version} has no golden images: rebuild it with "
                                    "'defectkit bundle build --golden IMAGE=EXPECTED.json'")
        return report
    wanted = set(backends) if backends is not None else None
    loaded = {_label(d): d for d in detectors}
    for name, model in runnable_models(manifest):
        label = f"{name}:{Path(model.file).name}"
        if (wanted is not None and name not in wanted) or label in loaded:
            continue
        try:
            loaded[label] = bundle_detector(manifest, model, name, threads)
        except Exception as exc:  # any failure of a backend is a failed self-test, never a crash of the runtime
            report.results.append(GoldenResult(label, model.file, 0, 0, [f"cannot load: {exc}"]))
    for label, det in loaded.items():
        report.backends.append(label)
        for image_name, image, expected in golden:
            try:
                got = det.detect(image)[0]
            except Exception as exc:  # idem: the report names the backend and the error
                report.results.append(GoldenResult(label, image_name, len(expected), 0, [f"inference failed: {exc}"]))
                continue
            report.results.append(GoldenResult(label, image_name, len(expected), len(got), compare(expected, got, tol)))
    report.seconds = time.perf_counter() - t0
    (log.info if report.ok else log.error)("%s", report.line())
    return report
