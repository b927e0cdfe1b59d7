"""Helpers for the edge-runtime loop tests: real signed bundles around small real models, test images.

:func:`make_bundle` builds a bundle the way the kit does (``compress.bundle.build_bundle``): a small real ONNX
detector (scores follow the image's red channel, so a test picks OK or NG by colour), a drift reference
built with :func:`edge_runtime.run.drift_features_of` on in-distribution frames, and golden images whose
expected detections come from the same detector built in paddle and run on paddle.inference (not from the ONNX
model on ONNX Runtime, which would make every self-test pass by construction). :func:`export_tiny_detector` makes a tiny *paddle* detector
in the no-NMS export form, which becomes both an ONNX model (paddle2onnx) and a Paddle Lite ``.nb``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from compress.bundle import ModelFile, build_bundle
from compress.keys import init_keys, load_private_key
from edge_runtime.decision import decide
from edge_runtime.settings import BoxSettings, RuntimeSettings
from edge_runtime.drift import build_reference
from edge_runtime.drift.synthetic import BoardStream
from edge_runtime.modelspec import InputSpec, PostprocessSpec
from edge_runtime.predict import Detector
from edge_runtime.run import drift_features_of
from edge_runtime.selftest import expected_record
from tests.edgebox import ROOT, run_paddle_script
from tests.test_edge_onnx_models import build_raw_model, write_deploy

CLASSES = ["short", "open"]
# boxes in 64x64 network pixels; scores = base * mean red of the input (0..1)
BOXES = np.array([[10, 10, 30, 30], [40, 40, 60, 60], [0, 0, 8, 8]], np.float32)
BASE_SCORES = np.array([[1.0, 0.2, 0.01], [0.3, 0.9, 0.02]], np.float32)  # [C=2, A=3]


@dataclass
class Keys:
    private: Path
    public: Path


def make_keys(base: Path) -> Keys:
    pair = init_keys(base / "keys")
    return Keys(pair.private, pair.public)


def red_image(red: int, seed: int, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    """A noisy frame whose red channel mean is about ``red`` (BGR)."""
    rng = np.random.default_rng(seed)
    img = np.empty((*size, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 60, 90, red
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def write_images(folder: Path, reds: Sequence[int], seed: int = 0, ext: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, red in enumerate(reds):
        path = folder / f"part_{i:04d}{ext}"
        cv2.imwrite(str(path), red_image(red, seed + i))
        out.append(path)
    return out


def onnx_source(base: Path) -> Path:
    """The test ONNX detector with a deploy.json beside it (so :class:`Detector` can load it directly)."""
    src = base / "onnx_src"
    src.mkdir(parents=True, exist_ok=True)
    build_raw_model(src / "model.onnx", BOXES, BASE_SCORES, channel=0)
    write_deploy(src, "model.onnx", CLASSES, nms="host")
    return src / "model.onnx"


def board_frames(n: int, seed: int, style=None) -> list[np.ndarray]:
    from edge_runtime.drift.synthetic import IN_DISTRIBUTION

    stream = BoardStream(style or IN_DISTRIBUTION, seed=seed, size=160)
    return [stream.next().image for _ in range(n)]


def drift_reference(base: Path, detector: Detector, frames: Sequence[np.ndarray]) -> Path:
    """drift_reference.json from in-distribution frames, built the way the trainer builds it."""
    cfg = RuntimeSettings()
    feats = []
    for img in frames:
        dets = detector(img)
        feats.append(drift_features_of(img, decide(dets, CLASSES, cfg), len(CLASSES)))
    ref = build_reference(feats, class_names=CLASSES)
    return ref.save(base / "drift_reference.json")


# The red-channel test detector again, as a paddle model: the golden expectations of make_bundle come from it on
# paddle.inference (what compress does for a real line: golden from the paddle model, the box checks ONNX Runtime
# or Lite against them), so the self-test compares two different runtimes and can fail.
_PADDLE_TWIN = """
import hashlib, json, os, sys
sys.path.insert(0, {root!r})
import zlib  # noqa: F401  -- before paddle
import numpy as np
from detect.heavy import paddle_stack
paddle = paddle_stack().paddle
out = {out!r}
if not os.path.exists(os.path.join(out, "model.pdmodel")):
    class RedTwin(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.register_buffer("anchors", paddle.to_tensor(np.array({boxes!r}, np.float32)[None]))
            self.register_buffer("base", paddle.to_tensor(np.array({scores!r}, np.float32)[None]))

        def forward(self, image, scale_factor):
            m = image[:, 0, :, :].mean()  # scores = base * mean of the (RGB) input's red channel
            sf = paddle.concat([scale_factor[:, 1:2], scale_factor[:, 0:1]], axis=1)
            return self.anchors / paddle.tile(sf, [1, 2]).unsqueeze(1), self.base * m

    model = RedTwin()
    model.eval()
    spec = [paddle.static.InputSpec([1, 3, 64, 64], "float32", "image"),
            paddle.static.InputSpec([1, 2], "float32", "scale_factor")]
    paddle.jit.save(model, os.path.join(out, "model"), input_spec=spec)
    from tests.test_edge_onnx_models import write_deploy
    write_deploy(__import__("pathlib").Path(out), "model.pdmodel", {classes!r}, nms="host", fmt="paddle")
import cv2
from edge_runtime.predict import Detector
from edge_runtime.selftest import expected_record
det = Detector.from_model(os.path.join(out, "model.pdmodel"), backend="paddle", threads=1)
assert det.backend.name == "paddle", det.backend.name
for path in {images!r}:
    rec = expected_record(det(cv2.imread(path)), {classes!r})
    key = hashlib.sha256(open(path, "rb").read()).hexdigest()
    tmp = os.path.join(out, "expected", key + ".json.tmp" + str(os.getpid()))
    with open(tmp, "w") as fh:
        json.dump(rec, fh)
    os.replace(tmp, os.path.join(out, "expected", key + ".json"))
"""


def paddle_golden(images: Sequence[Path]) -> list[dict]:
    """Expected detections of the red-channel detector on ``images``, from its paddle twin on paddle.inference.

    Cached per machine (keyed by the twin's code and each image's bytes): one paddle subprocess makes the missing ones."""
    import hashlib
    import tempfile

    code_key = hashlib.sha256((_PADDLE_TWIN + repr((BOXES.tolist(), BASE_SCORES.tolist(), CLASSES))).encode()).hexdigest()
    twin = Path(tempfile.gettempdir()) / f"defectkit-paddle-twin-{code_key[:12]}"
    (twin / "expected").mkdir(parents=True, exist_ok=True)
    keys = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in images]
    missing = [str(p) for p, k in zip(images, keys) if not (twin / "expected" / f"{k}.json").is_file()]
    if missing:
        code = _PADDLE_TWIN.format(root=str(ROOT), out=str(twin), boxes=BOXES.tolist(), scores=BASE_SCORES.tolist(),
                                   classes=CLASSES, images=missing)
        script = Path(tempfile.mkdtemp(prefix="defectkit-twin-")) / "paddle_twin.py"
        run_paddle_script(code, script)
    return [json.loads((twin / "expected" / f"{k}.json").read_text()) for k in keys]


def make_bundle(base: Path, keys: Keys, version: str = "1.0.0", parent: Optional[str] = None,
                models: Optional[list[ModelFile]] = None, golden_reds: Sequence[int] = (40, 230),
                expected_override: Optional[dict] = None, reference_frames: int = 120,
                onnx_model: Optional[Path] = None, golden_model: Optional[Path] = None,
                settings: Optional[BoxSettings] = None) -> Path:
    """A signed bundle directory ``base/store/test-line/<version>`` (and its .tar.gz beside it).

    Golden expectations come from another runtime than the box's: the paddle twin of the red-channel detector on
    paddle.inference (:func:`paddle_golden`), or ``golden_model`` (a paddle model with deploy.json beside it, run
    on paddle.inference) when ``onnx_model`` is another detector. ``settings``: the line's runtime / drift /
    report sections in the manifest (default: the defaults)."""
    if onnx_model is not None and golden_model is None and golden_reds and expected_override is None:
        raise ValueError("make_bundle(onnx_model=...) needs golden_model=: the paddle model the golden set comes from")
    onnx_path = onnx_model or onnx_source(base)
    detector = Detector.from_model(onnx_path, backend="onnxruntime", threads=1)
    ref_path = base / "drift_reference.json"
    if not ref_path.exists():
        drift_reference(base, detector, board_frames(reference_frames, seed=1))
    gdir = base / "golden_src"
    paths = [write_images(gdir / f"g{version}_{i}", [red], seed=100 + i)[0] for i, red in enumerate(golden_reds)]
    if expected_override is not None:
        expected = [expected_override] * len(paths)
    elif golden_model is not None:
        ref = Detector.from_model(golden_model, backend="paddle", threads=1)
        expected = [expected_record(ref(cv2.imread(str(p))), CLASSES) for p in paths]
    else:
        expected = paddle_golden(paths)
    golden = list(zip(paths, expected))
    models = models or [ModelFile(onnx_path, "onnx", "any", "fp32", "host", None)]
    return build_bundle(
        base / "store", "test-line", version, parent, models, detector.spec.input, detector.spec.postprocess,
        CLASSES, {"map50": 0.9}, {"method": "none"}, golden, ref_path, load_private_key(keys.private),
        settings=settings or BoxSettings(),
    )


def resign_bundle(bundle_dir: Path, keys: Keys, version: str, edit) -> Path:
    """A copy of ``bundle_dir`` as ``version`` whose manifest dict went through ``edit(dict)`` and was signed again
    with the line's key: a correctly signed bundle with whatever manifest a test needs (e.g. no settings)."""
    import shutil
    import tarfile

    from edge_runtime.bundle import MANIFEST, SIGNATURE, signature_document

    dest = bundle_dir.parent / version
    shutil.copytree(bundle_dir, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["version"] = version
    edit(manifest)
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    key = load_private_key(keys.private)
    (dest / MANIFEST).write_bytes(body)
    (dest / SIGNATURE).write_bytes(signature_document(body, key.sign(body), key.public_key()))
    with tarfile.open(archive_of(dest), "w:gz") as tar:
        for path in sorted(dest.rglob("*")):
            tar.add(str(path), arcname=path.relative_to(dest).as_posix(), recursive=False)
    return dest


def archive_of(bundle_dir: Path) -> Path:
    return bundle_dir.parent / f"{bundle_dir.name}.tar.gz"


# A tiny detector in the paddle no-NMS export form: boxes [1,A,4] in original pixels, scores [1,C,A].
_TINY_DETECTOR = """
import sys
sys.path.insert(0, {root!r})
from detect.heavy import paddle_stack
paddle = paddle_stack().paddle

class TinyDet(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, stride=2, padding=1)
        self.act = paddle.nn.Swish()
        self.fc = paddle.nn.Linear(8, 2 * 3)
        anchors = paddle.to_tensor([[[4.0, 4.0, 28.0, 28.0], [30.0, 8.0, 60.0, 40.0], [8.0, 36.0, 40.0, 62.0]]])
        self.register_buffer("anchors", anchors)

    def forward(self, image, scale_factor):
        f = self.act(self.conv(image)).mean(axis=[2, 3])
        scores = paddle.nn.functional.sigmoid(self.fc(f) * 8.0 - 1.0).reshape([1, 2, 3])
        sf = paddle.concat([scale_factor[:, 1:2], scale_factor[:, 0:1]], axis=1)
        sf4 = paddle.tile(sf, [1, 2]).unsqueeze(1)
        return self.anchors / sf4, scores

paddle.seed(11)
model = TinyDet()
model.eval()
spec = [paddle.static.InputSpec([1, 3, 64, 64], "float32", "image"),
        paddle.static.InputSpec([1, 2], "float32", "scale_factor")]
paddle.jit.save(model, {out!r}, input_spec=spec)

import paddle2onnx
paddle2onnx.export({out!r} + ".pdmodel", {out!r} + ".pdiparams", {onnx!r}, opset_version=13,
                   enable_onnx_checker=True, verbose=False)
"""


def export_tiny_detector(out_dir: Path) -> tuple[Path, Path]:
    """(paddle export dir with model.pdmodel/.pdiparams, model.onnx converted from it by paddle2onnx)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    code = _TINY_DETECTOR.format(root=str(ROOT), out=str(out_dir / "model"), onnx=str(onnx_path))
    run_paddle_script(code, out_dir.parent / "export_tiny_detector.py")
    return out_dir, onnx_path


def write_settings(path: Path, **sections: dict) -> Path:
    path.write_text(json.dumps(sections))
    return path


class FakeCapture:
    """Stands in for a cv2.VideoCapture of a camera (no camera exists on this machine).

    ``script`` items: an image -> a good read, None -> a failed read, an Exception -> read raises it; when the
    script is used up every read fails (the camera dropped). ``generator`` instead makes a frame per read
    forever. ``opened=False`` is a camera that cannot be opened."""

    def __init__(self, script=None, generator=None, opened: bool = True) -> None:
        self.script = list(script or [])
        self.generator = generator
        self.opened = opened
        self.released = False
        self.reads = 0

    def isOpened(self) -> bool:  # noqa: N802 (cv2's name)
        return self.opened and not self.released

    def read(self):
        self.reads += 1
        if self.generator is not None:
            return True, self.generator()
        if not self.script:
            return False, None
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return (item is not None), item

    def release(self) -> None:
        self.released = True


class FakeCameraFactory:
    """``capture_factory`` for CameraSource: hands out the given captures in order, then unopenable ones."""

    def __init__(self, captures) -> None:
        self.captures = list(captures)
        self.opened: list = []
        self.specs: list = []

    def __call__(self, spec, *args):
        self.specs.append(spec)
        cap = self.captures.pop(0) if self.captures else FakeCapture(opened=False)
        self.opened.append(cap)
        return cap
