"""Paddle Lite adapter: runs a ``.nb`` made by ``paddle_lite_opt`` (``compress.lite.opt_in_edgebox``).

Three Paddle Lite traps are handled before they can crash the process (STACK.md):
- a ``.nb`` made by another Paddle Lite version misbehaves: the version recorded with the model (deploy.json or
  the bundle manifest ``runtime_version``, and the opt version in the file header) must match the installed one;
- an ARM ``.nb`` segfaults in the x86 runtime: the kernel targets recorded in the file are checked first;
- ``get_output(i)`` past the last output aborts: only outputs listed by ``get_output_names()`` are read.
Inputs are set by index in the model's feed order (image, scale_factor).
"""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from edge_runtime.backends.base import Backend
from edge_runtime.errors import ModelError

# Paddle Lite's TargetType numbering, as written into each kernel's "op/alias/target/precision/layout" key.
_LITE_TARGETS = {1: "host", 2: "x86", 3: "cuda", 4: "arm", 5: "opencl", 6: "any", 7: "fpga", 8: "npu", 9: "xpu"}
_KERNEL_KEY = re.compile(rb"[a-z0-9_]+/[A-Za-z0-9_]+/(\d+)/\d+/\d+")


def installed_version() -> str:
    """The installed paddlelite distribution version, e.g. ``2.13rc0`` (what opt_in_edgebox records)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("paddlelite")
    except PackageNotFoundError:
        return "unknown"


def nb_header(path: Path) -> tuple[str, set[str]]:
    """(opt version written in the file header, e.g. ``v2.13-rc``; kernel targets the model was optimized for)."""
    data = path.read_bytes()
    if len(data) < 18:
        raise ModelError(f"{path} is too short for a Paddle Lite .nb model ({len(data)} bytes): the file is damaged")
    opt_version = data[2:18].split(b"\0", 1)[0].decode("ascii", "replace")
    targets = {_LITE_TARGETS.get(int(m.group(1)), m.group(1).decode()) for m in _KERNEL_KEY.finditer(data)}
    return opt_version, targets


def _major_minor(version: str) -> str:
    m = re.match(r"v?(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else version


def recorded_version(path: Path) -> tuple[str | None, str]:
    """The Paddle Lite version recorded for ``path``: from deploy.json beside it or the bundle manifest above it."""
    for meta in (path.parent / "deploy.json", path.parent / "manifest.json", path.parent.parent / "manifest.json"):
        if not meta.is_file():
            continue
        try:
            doc = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for entry in doc.get("models", []) if isinstance(doc, dict) else []:
            if isinstance(entry, dict) and (meta.parent / str(entry.get("file", ""))).resolve() == path.resolve():
                return entry.get("runtime_version"), str(meta)
    return None, ""


class PaddleLiteBackend(Backend):
    """``MobileConfig`` + ``create_paddle_predictor`` over one ``.nb`` file."""

    name = "paddlelite"

    def __init__(self, expected_version: str | None = None) -> None:
        super().__init__()
        # The caller (bundle loader) may pass the manifest's runtime_version; otherwise it is looked up.
        self.expected_version = expected_version
        self._predictor = None

    def check_model(self, path: Path) -> None:
        """Refuse a .nb made by another Paddle Lite version or for another CPU, before loading it."""
        installed = installed_version()
        expected, source = (self.expected_version, "the bundle manifest") if self.expected_version else \
            recorded_version(path)
        if expected is not None and expected != installed:
            raise ModelError(
                f"{path} was made by Paddle Lite {expected} ({source}), but this box runs paddlelite {installed}: "
                f"refused (a .nb must be run by the version that made it). Re-run opt with {installed}, or install "
                f"paddlelite=={expected}."
            )
        opt_version, targets = nb_header(path)
        if installed != "unknown" and _major_minor(opt_version) != _major_minor(installed):
            raise ModelError(
                f"{path} header says it was made by Paddle Lite opt {opt_version}, this box runs paddlelite "
                f"{installed}: refused. Convert it again with the matching opt."
            )
        machine = "arm" if platform.machine().lower().startswith(("arm", "aarch")) else "x86"
        foreign = sorted(t for t in targets if t not in ("host", "any", machine))
        if foreign:
            raise ModelError(
                f"{path} holds kernels for {', '.join(foreign)}, but this is an {machine} machine: refused "
                f"(running it would crash). Use the {machine} .nb of the bundle."
            )

    def load(self, path: Path, threads: int) -> None:
        from edge_runtime.errors import require

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"Paddle Lite model {path} does not exist")
        self.check_model(path)
        lite = require("paddlelite.lite", "edge", "The Paddle Lite backend")
        config = lite.MobileConfig()
        config.set_model_from_file(str(path))
        self.threads_settable = hasattr(config, "set_threads")  # ARM builds only; the x86 wheels have none
        if self.threads_settable:
            config.set_threads(int(threads))
        try:
            self._predictor = lite.create_paddle_predictor(config)
        except Exception as exc:  # pybind turns C++ errors into RuntimeError-like exceptions
            raise ModelError(f"Paddle Lite cannot load {path}: {exc}") from exc
        self._inputs = list(self._predictor.get_input_names())
        self._outputs = list(self._predictor.get_output_names())

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self._predictor is None:
            raise ModelError("paddlelite: infer() before load()")
        self.check_feeds(feeds)
        for i, name in enumerate(self._inputs):  # by index, in the model's feed order
            self._predictor.get_input(i).from_numpy(np.ascontiguousarray(feeds[name]))
        self._predictor.run()
        # Never ask for an output index past the last one: Paddle Lite aborts the process.
        return [np.array(self._predictor.get_output(i).numpy(), copy=True) for i in range(len(self._outputs))]

    def version(self) -> str:
        return installed_version()
