"""Inference backends: an explicit table from names to lazily imported adapters.

Nothing here imports a runtime library: an edge box with only Paddle Lite (or only ONNX Runtime)
imports the package fine, and choosing a backend whose library is missing raises a
:class:`MissingDependencyError` that names the package and the extra installing it.
"""
from __future__ import annotations

import importlib
import importlib.util
import platform
from dataclasses import dataclass
from typing import Sequence

from edge_runtime.backends.base import Backend
from edge_runtime.errors import ConfigError, MissingDependencyError, ModelError
from edge_runtime.modelspec import ModelEntry, ModelSpec


@dataclass(frozen=True)
class BackendInfo:
    """Where a backend lives and what it needs: module/class imported only when it is created."""

    name: str
    module: str  # the adapter module, e.g. edge_runtime.backends.onnxruntime_backend
    class_name: str
    package: str  # the third-party import name whose presence makes the backend available
    pip_hint: str  # how to install it
    formats: tuple[str, ...]  # model formats (deploy.json "format") it runs


# Order is preference when several backends could run the same model.
BACKENDS: dict[str, BackendInfo] = {}


def register_backend(info: BackendInfo) -> None:
    """Add (or replace) a backend, e.g. the Paddle Lite adapter: one line per runtime, no import magic."""
    BACKENDS[info.name] = info


register_backend(
    BackendInfo(
        "onnxruntime", "edge_runtime.backends.onnxruntime_backend", "OnnxRuntimeBackend",
        "onnxruntime", "pip install 'defectkit[edge]'", ("onnx",),
    )
)
register_backend(
    BackendInfo(
        "paddle", "edge_runtime.backends.paddle_inference_backend", "PaddleInferenceBackend",
        "paddle", "pip install 'defectkit[train]' (paddlepaddle==2.6.2)", ("paddle",),
    )
)
register_backend(
    BackendInfo(
        "paddlelite", "edge_runtime.backends.paddlelite_backend", "PaddleLiteBackend",
        "paddlelite", "pip install paddlelite==2.13rc0 (Python 3.8-3.10; or scripts/edge_box.sh)", ("paddlelite",),
    )
)


def _info(name: str) -> BackendInfo:
    if name not in BACKENDS:
        import difflib

        close = difflib.get_close_matches(name, list(BACKENDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown backend '{name}'.{hint} Known backends: {', '.join(BACKENDS)}.")
    return BACKENDS[name]


def is_available(name: str) -> bool:
    """True if the backend's library can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(_info(name).package) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    return [name for name in BACKENDS if is_available(name)]


def missing_error(name: str) -> MissingDependencyError:
    info = _info(name)
    return MissingDependencyError(
        f"backend '{name}' needs the Python package '{info.package}', which is not installed. "
        f"Install it with: {info.pip_hint}"
    )


def create_backend(name: str) -> Backend:
    """A fresh, unloaded adapter of backend ``name`` (imports its module now)."""
    info = _info(name)
    if not is_available(name):
        raise missing_error(name)
    module = importlib.import_module(info.module)
    return getattr(module, info.class_name)()


def _host_target() -> str:
    machine = platform.machine().lower()
    return "arm" if machine.startswith(("arm", "aarch")) else "x86"


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    entry: ModelEntry


def choose_backend(
    spec: ModelSpec, preferred: str | None = None, model_file: str | None = None
) -> BackendChoice:
    """Pick a (backend, model entry) pair: the model's format decides, then what is importable.

    With ``model_file`` only that entry is considered; otherwise entries built for this machine's
    target (or "any") are tried in deploy.json order. ``preferred`` forces a backend and fails loudly
    when it cannot run the model or is not installed.
    """
    entries: Sequence[ModelEntry] = [spec.find(model_file)] if model_file else spec.models
    if not model_file:
        host = _host_target()
        entries = [e for e in entries if e.target in (host, "any")] or list(entries)
    if preferred is not None:
        info = _info(preferred)
        runnable = [e for e in entries if e.format in info.formats]
        if not runnable:
            formats = ", ".join(sorted({e.format for e in entries}))
            raise ModelError(
                f"backend '{preferred}' runs {', '.join(info.formats)} models, but the model is {formats}. "
                f"Pick another backend or export the model as {info.formats[0]}."
            )
        if not is_available(preferred):
            raise missing_error(preferred)
        return BackendChoice(preferred, runnable[0])
    wanted: list[str] = []
    for entry in entries:
        for name, info in BACKENDS.items():
            if entry.format in info.formats:
                if is_available(name):
                    return BackendChoice(name, entry)
                wanted.append(name)
    if not wanted:
        formats = ", ".join(sorted({e.format for e in entries}))
        raise ModelError(f"no backend of this runtime runs {formats} models (known: {', '.join(BACKENDS)}).")
    first = wanted[0]
    raise MissingDependencyError(
        f"no installed backend can run this model: it needs {' or '.join(dict.fromkeys(wanted))}. "
        f"Install one, e.g.: {BACKENDS[first].pip_hint}"
    )


__all__ = [
    "Backend",
    "BackendInfo",
    "BackendChoice",
    "BACKENDS",
    "register_backend",
    "is_available",
    "available_backends",
    "create_backend",
    "choose_backend",
]
