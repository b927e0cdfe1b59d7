"""Detection on the edge box: a :class:`Detector` (pre -> backend -> post) and folder prediction.

The Detector is the task wrapper of the model_api shape: it owns the pre- and post-processing from
``deploy.json`` and holds one backend adapter. :func:`predict_folder` writes one JSON line per image
(the wire form) and optional annotated PNGs.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np

from edge_runtime.backends import Backend, choose_backend, create_backend
from edge_runtime.decision import decide
from edge_runtime.settings import RuntimeSettings
from edge_runtime.errors import ModelError, UserInputError
from edge_runtime.fileio import atomic_write_bytes
from edge_runtime.modelspec import FILENAME, ModelEntry, ModelSpec
from edge_runtime.postprocess import Detections, decode_outputs
from edge_runtime.preprocess import model_feeds

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Timing:
    """Milliseconds spent in each stage of one image."""

    pre: float
    infer: float
    post: float

    @property
    def total(self) -> float:
        return self.pre + self.infer + self.post

    def to_dict(self) -> dict[str, float]:
        return {"pre": round(self.pre, 3), "infer": round(self.infer, 3), "post": round(self.post, 3)}


class Detector:
    """One deployable model ready to run: ``detector(image_bgr) -> Detections``.

    ``last_timing`` holds the stage timings of the latest call.
    """

    def __init__(self, spec: ModelSpec, entry: ModelEntry, backend: Backend, model_path: Path) -> None:
        self.spec = spec
        self.entry = entry
        self.backend = backend
        self.model_path = model_path
        self.last_timing = Timing(0.0, 0.0, 0.0)
        unknown = [n for n in backend.input_names if n not in spec.input.feeds]
        if unknown:
            raise ModelError(
                f"'{model_path}' asks for inputs {backend.input_names}, but {FILENAME} feeds "
                f"{list(spec.input.feeds)} (the runtime provides 'image' and 'scale_factor'). Re-export the model."
            )

    @property
    def classes(self) -> list[str]:
        return self.spec.classes

    @classmethod
    def from_model(
        cls, path: str | Path, backend: str | None = None, threads: int = 2, verify: bool = True
    ) -> "Detector":
        """Load a model file (or an export directory) with the ``deploy.json`` beside it.

        ``backend`` forces one ("onnxruntime", "paddle", ...); by default the model format and the
        installed libraries decide. ``verify`` checks the file's sha256 against deploy.json.
        """
        path = Path(path)
        if not path.exists():
            raise UserInputError(f"model '{path}' does not exist. Pass a model file from an export directory.")
        spec = ModelSpec.load(path)
        choice = choose_backend(spec, preferred=backend, model_file=None if path.is_dir() else path.name)
        directory = path if path.is_dir() else path.parent
        if verify:
            model_path = spec.verify(directory, choice.entry)
        else:
            model_path = directory / choice.entry.file
        if threads < 1:
            raise UserInputError(f"threads must be at least 1, got {threads}.")
        adapter = create_backend(choice.backend)
        adapter.load(model_path, threads)
        log.info("loaded %s with %s %s (%d threads)", model_path, choice.backend, adapter.version(), threads)
        return cls(spec, choice.entry, adapter, model_path)

    def prepare(self, image_bgr: np.ndarray) -> dict[str, np.ndarray]:
        """Pre-processing only: the backend's feeds for one image (the inspection loop runs this in its
        reader thread, beside the inference of the previous frame)."""
        return model_feeds(image_bgr, self.spec.input, self.backend.input_names)

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The backend's forward pass on prepared feeds."""
        return self.backend.infer(feeds)

    def postprocess(self, outputs, min_score: float | None = None) -> Detections:
        """Outputs -> Detections. ``min_score``: the decision floor of the box (candidates below it dropped
        before NMS; see :mod:`edge_runtime.postprocess`); None = the full NMS of deploy.json (evaluation)."""
        return decode_outputs(outputs, self.entry.nms, self.spec.postprocess, len(self.spec.classes), min_score)

    def detect(self, image_bgr: np.ndarray, min_score: float | None = None) -> tuple[Detections, Timing]:
        t0 = time.perf_counter()
        feeds = self.prepare(image_bgr)
        t1 = time.perf_counter()
        outputs = self.infer(feeds)
        t2 = time.perf_counter()
        dets = self.postprocess(outputs, min_score)
        t3 = time.perf_counter()
        timing = Timing((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)
        self.last_timing = timing
        return dets, timing

    def __call__(self, image_bgr: np.ndarray) -> Detections:
        return self.detect(image_bgr)[0]


@dataclass
class Summary:
    """What a folder prediction did; latencies are medians over the decoded images (ms)."""

    images: int = 0
    errors: int = 0
    ng: int = 0
    ok: int = 0
    out: Path | None = None
    annotated: Path | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    backend: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "errors": self.errors,
            "ng": self.ng,
            "ok": self.ok,
            "out": str(self.out) if self.out else None,
            "annotated": str(self.annotated) if self.annotated else None,
            "latency_ms": self.latency_ms,
            "backend": self.backend,
        }

    def line(self) -> str:
        lat = self.latency_ms
        text = f"{self.images} images: {self.ng} NG, {self.ok} OK"
        if self.errors:
            text += f", {self.errors} unreadable"
        if lat:
            text += (
                f"; median latency {lat['total']:.1f} ms (pre {lat['pre']:.1f}, infer {lat['infer']:.1f}, "
                f"post {lat['post']:.1f}) on {self.backend}"
            )
        return text + f"; predictions in {self.out}"


def list_images(source_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under ``source_dir`` (recursive, sorted), leaving out ``exclude`` (annotated output)."""
    if not source_dir.is_dir():
        raise UserInputError(f"source '{source_dir}' is not a directory of images.")
    found = []
    for path in sorted(source_dir.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if exclude is not None and exclude.resolve() in path.resolve().parents:
            continue
        found.append(path)
    if not found:
        raise UserInputError(f"no images found in '{source_dir}' (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return found


def _progress(items: list[Path], desc: str) -> Iterable[Path]:
    """tqdm when installed (the edge box may not have it), else a log line every 10 %."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(items, desc)
    return tqdm(items, desc=desc, unit="img", file=sys.stderr, disable=None)


def _plain_progress(items: list[Path], desc: str) -> Iterator[Path]:
    step = max(1, len(items) // 10)
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == len(items):
            log.info("%s: %d/%d images", desc, i, len(items))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _read_image(path: Path) -> np.ndarray | None:
    """cv2.imread, but None instead of an exception for files that are not images."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
        return cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except (OSError, cv2.error):
        return None


def predict_folder(
    model: str | Path | Detector,
    source_dir: str | Path,
    out_jsonl: str | Path,
    runtime_cfg: RuntimeSettings | None = None,
    save_annotated: Path | None = None,
    backend: str | None = None,
    threads: int = 2,
) -> Summary:
    """Predict every image of a folder: one JSON line per image, optional annotated PNGs.

    Unreadable images are logged and written as a line with "error". The JSON-lines file appears
    atomically when the run ends (a crash leaves the previous file untouched).
    """
    cfg = runtime_cfg or RuntimeSettings()
    detector = model if isinstance(model, Detector) else Detector.from_model(model, backend=backend, threads=threads)
    cfg.thresholds_for(detector.classes)  # refuse unknown class names before the first image
    source_dir = Path(source_dir)
    out_jsonl = Path(out_jsonl)
    images = list_images(source_dir, exclude=save_annotated)
    summary = Summary(out=out_jsonl, annotated=save_annotated, backend=detector.backend.name)
    timings: list[Timing] = []
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_jsonl.name}.", suffix=".tmp", dir=out_jsonl.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for path in _progress(images, "predict"):
                record = _predict_one(detector, path, cfg, source_dir, save_annotated, summary, timings)
                fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out_jsonl)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if timings:
        summary.latency_ms = {
            key: round(statistics.median(getattr(t, key) for t in timings), 3)
            for key in ("pre", "infer", "post", "total")
        }
    return summary


def _predict_one(
    detector: Detector,
    path: Path,
    cfg: RuntimeSettings,
    source_dir: Path,
    save_annotated: Path | None,
    summary: Summary,
    timings: list[Timing],
) -> dict[str, Any]:
    summary.images += 1
    image = _read_image(path)
    if image is None:
        summary.errors += 1
        log.warning("cannot decode '%s': not an image or truncated; written with an error line", path)
        return {"time": _now(), "source": str(path), "error": "cannot decode image (not an image or truncated)"}
    dets, timing = detector.detect(image)
    verdict = decide(dets, detector.classes, cfg)
    timings.append(timing)
    if verdict.is_ng:
        summary.ng += 1
    else:
        summary.ok += 1
    if save_annotated is not None:
        from edge_runtime.draw import draw_detections

        drawn = draw_detections(image, dets, detector.classes, verdict, cfg.roi)
        ok, png = cv2.imencode(".png", drawn)
        if ok:
            atomic_write_bytes(Path(save_annotated) / path.relative_to(source_dir).with_suffix(".png"), png.tobytes())
    return {
        "time": _now(),
        "source": str(path),
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "detections": [
            {**rec, "counted": bool(c)} for rec, c in zip(dets.to_records(detector.classes), verdict.mask.tolist())
        ],
        "verdict": verdict.verdict,
        "reason": verdict.reason,
        "latency_ms": timing.to_dict(),
    }
