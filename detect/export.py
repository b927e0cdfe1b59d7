"""Export trained weights for deployment, driven by a table of formats (Ultralytics ``export_formats``).

One export directory holds every variant side by side, described by one ``deploy.json``
(``edge_runtime.modelspec``) so that the edge runtime needs nothing from training:

    model.pdmodel / .pdiparams            paddle inference, NMS in the graph
    model_nonms.pdmodel / .pdiparams      paddle inference, raw boxes + scores (NMS on the host)
    model.onnx / model_nonms.onnx         the same two through paddle2onnx, checked with onnx.checker

Each ``export_<format>`` is wrapped by :func:`_timed`, and a format that needs another calls it first.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from detect.linespec import LineSpec
from detect.ppyoloe import RunPaths, activate, inference_config, model_input
from edge_runtime.errors import ConfigError, ModelError
from edge_runtime.modelspec import ModelEntry, ModelSpec, PostprocessSpec, file_sha256

log = logging.getLogger("defectkit.export")


@dataclass
class ExportResult:
    directory: Path
    files: dict[str, Path] = field(default_factory=dict)  # variant name -> model file
    seconds: dict[str, float] = field(default_factory=dict)
    deploy_json: Path | None = None


def _timed(name: str) -> Callable:
    """Time and log one export step; record the produced file in the result."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(ctx: "_ExportContext", *args: Any, **kwargs: Any) -> Path:
            if name in ctx.result.files:
                return ctx.result.files[name]
            start = time.perf_counter()
            path = fn(ctx, *args, **kwargs)
            ctx.result.seconds[name] = round(time.perf_counter() - start, 2)
            ctx.result.files[name] = path
            log.info("exported %s -> %s in %.1f s", name, path, ctx.result.seconds[name])
            return path

        return inner

    return wrap


@dataclass
class _ExportContext:
    spec: LineSpec
    weights: Path | None
    out: Path
    result: ExportResult
    model: Any = None  # a live dygraph detector exported instead of ``weights`` (:func:`export_model`)


def _paddle_export(ctx: _ExportContext, with_nms: bool, stem: str) -> Path:
    """ppdet's ``Trainer.export`` with NMS in the graph or excluded; files renamed to ``<stem>.*``."""
    from ppdet.engine import Trainer
    from ppdet.utils.checkpoint import load_weight

    tmp = ctx.out / f".tmp-{stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = inference_config(ctx.spec, RunPaths(tmp))
    cfg["exclude_nms"] = not with_nms
    live = activate(cfg)
    if ctx.model is not None:
        _prepare_live_model(ctx.model, with_nms)
        live["model"] = ctx.model
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(live, mode="test")
        if ctx.model is None:
            load_weight(trainer.model, str(ctx.weights)[: -len(".pdparams")])
        trainer.export(str(tmp))
    if ctx.model is not None:
        ctx.model.__dict__.pop("forward", None)  # the traced forward stays with this export only
    produced = tmp / live["filename"]
    if not (produced / "model.pdmodel").is_file():
        raise ModelError(f"ppdet export wrote no model.pdmodel into '{produced}'.")
    for suffix in (".pdmodel", ".pdiparams"):
        shutil.move(str(produced / f"model{suffix}"), ctx.out / f"{stem}{suffix}")
    if with_nms:
        shutil.move(str(produced / "infer_cfg.yml"), ctx.out / "infer_cfg.yml")
    shutil.rmtree(tmp, ignore_errors=True)
    return ctx.out / f"{stem}.pdmodel"


def _prepare_live_model(model: Any, with_nms: bool) -> None:
    """Ready a live detector for one more ``Trainer.export``.

    A built model fixed its NMS choice at construction (``exclude_nms`` on the head), so it is set on the instance;
    ``paddle.jit.to_static`` replaced ``model.forward`` by a traced function during the previous export, which
    would be reused as is, so the class's own forward is put back.
    """
    model.__dict__.pop("forward", None)
    for layer in model.sublayers(include_self=True):
        if hasattr(layer, "exclude_nms"):
            layer.exclude_nms = not with_nms


@_timed("paddle")
def export_paddle(ctx: _ExportContext) -> Path:
    return _paddle_export(ctx, with_nms=True, stem="model")


@_timed("paddle_nonms")
def export_paddle_nonms(ctx: _ExportContext) -> Path:
    return _paddle_export(ctx, with_nms=False, stem="model_nonms")


def _onnx_from(ctx: _ExportContext, pdmodel: Path) -> Path:
    import onnx
    import paddle2onnx

    dst = pdmodel.with_suffix(".onnx")
    opset = ctx.spec.settings.export.opset
    with contextlib.redirect_stdout(io.StringIO()):
        paddle2onnx.export(str(pdmodel), str(pdmodel.with_suffix(".pdiparams")), str(dst),
                           opset_version=opset, enable_onnx_checker=True, verbose=False)
    if not dst.is_file():
        raise ModelError(f"paddle2onnx wrote no '{dst}' from '{pdmodel}'.")
    onnx.checker.check_model(str(dst))
    return dst


@_timed("onnx")
def export_onnx(ctx: _ExportContext) -> Path:
    return _onnx_from(ctx, export_paddle(ctx))


@_timed("onnx_nonms")
def export_onnx_nonms(ctx: _ExportContext) -> Path:
    return _onnx_from(ctx, export_paddle_nonms(ctx))


# name -> (exporter, model format, where NMS runs); the order is the order of deploy.json
EXPORT_FORMATS: dict[str, tuple[Callable[[_ExportContext], Path], str, str]] = {
    "paddle": (export_paddle, "paddle", "in_model"),
    "paddle_nonms": (export_paddle_nonms, "paddle", "host"),
    "onnx": (export_onnx, "onnx", "in_model"),
    "onnx_nonms": (export_onnx_nonms, "onnx", "host"),
}


def export(spec: LineSpec, weights: Path, out_dir: Path, formats: list[str] | None = None,
           meta: dict[str, Any] | None = None) -> ExportResult:
    """Export ``weights`` of ``spec`` into ``out_dir`` and write its ``deploy.json``."""
    from detect.heavy import paddle_stack

    formats = _check_formats(formats)
    weights = Path(weights)
    if not weights.is_file():
        raise ConfigError(f"weights '{weights}' do not exist. Train first: `defectkit train LINE.yaml`.")
    paddle_stack().paddle.set_device("cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = _ExportContext(spec, weights, out_dir, ExportResult(out_dir))
    return _export_formats(ctx, formats, {"source_weights": str(weights), **(meta or {})})


def export_model(spec: LineSpec, model: Any, out_dir: Path, formats: list[str] | None = None,
                 meta: dict[str, Any] | None = None) -> ExportResult:
    """Export a live dygraph detector (e.g. a pruned one, whose shapes a fresh model cannot load) like :func:`export`.

    ``model`` must already be in its deploy form if ``convert_to_deploy`` cannot run twice on it (one trace per
    format calls it each time); ``meta`` goes into deploy.json.
    """
    from detect.heavy import paddle_stack

    formats = _check_formats(formats)
    paddle_stack().paddle.set_device("cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = _ExportContext(spec, None, out_dir, ExportResult(out_dir), model=model)
    return _export_formats(ctx, formats, dict(meta or {}))


def _check_formats(formats: list[str] | None) -> list[str]:
    formats = formats or list(EXPORT_FORMATS)
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ConfigError(f"unknown export format(s) {unknown}; choose from {', '.join(EXPORT_FORMATS)}.")
    return formats


def _export_formats(ctx: _ExportContext, formats: list[str], meta: dict[str, Any]) -> ExportResult:
    """Run each format's exporter and write deploy.json (one ModelEntry per model file)."""
    spec = ctx.spec
    entries = []
    for name in formats:
        exporter, fmt, nms = EXPORT_FORMATS[name]
        path = exporter(ctx)
        entries.append(ModelEntry(file=path.name, format=fmt, target="any", precision="fp32", nms=nms,
                                  runtime_version=_runtime_version(fmt), sha256=file_sha256(path)))
    ctx.result.deploy_json = deploy_spec(spec, entries, meta).save(ctx.out)
    return ctx.result


def deploy_spec(spec: LineSpec, entries: list[ModelEntry], meta: dict[str, Any]) -> ModelSpec:
    """The deploy.json of a line's export: the line's model input, its export section's post-processing and
    these model files. Every export of a line (plain, QAT) describes itself with this one function; variants
    derived from an export use :meth:`ModelSpec.variant`."""
    ex = spec.settings.export
    post = PostprocessSpec.from_dict({"nms_iou": ex.nms_iou, "score_threshold": ex.score_threshold,
                                      "nms_top_k": ex.nms_top_k, "keep_top_k": ex.keep_top_k}, "export")
    return ModelSpec(line=spec.line, classes=list(spec.classes), input=model_input(spec), models=list(entries),
                     postprocess=post, meta=dict(meta))


def _runtime_version(fmt: str) -> str | None:
    if fmt == "paddle":
        return paddle_version()
    if fmt == "onnx":
        import paddle2onnx

        return f"paddle2onnx {paddle2onnx.__version__}"
    return None


def paddle_version() -> str:
    from detect.heavy import paddle_stack

    return f"paddle {paddle_stack().paddle.__version__}"
