"""Quantization-aware training (QAT): a few epochs of PaddleSlim fake-quant training from the fine-tuned weights.

The detector is quantized the way ppdet's own slim integration does it (``ppdet.slim.QAT`` over
``paddleslim.dygraph.quant.QAT``: RepVgg blocks converted to their deploy form first, so the convs that are
trained with fake quantization are the convs that ship), then trained with ppdet's ``Trainer`` and the kit's
callbacks (:func:`detect.train.build_session`: seeded loader, progress, history, best weights), evaluated on
the line's val set after every epoch. The best epoch is exported through ``Trainer.export``, which hands a
``slim_type: QAT`` model to ``save_quantized_model``: ``onnx_format=True`` writes QDQ
(``quantize_linear``/``dequantize_linear``) with int8 channel-wise weights, the form Paddle Lite 2.13rc0 reads.

Layers kept in FP32 (a module-based rule, not a list of numbers): the head's classification convs
``yolo_head.pred_cls.*`` (STACK.md: quantizing them capped scores at 0.5 and killed the classifier in ONNX
Runtime and MKLDNN alike) and ``yolo_head.proj_conv`` (ppdet already marks it: a fixed 0..reg_max projection
that decodes box distances). They are skipped through PaddleSlim's ``skip_quant`` attribute, so the rule survives
RepVgg fusion and any renumbering of parameters.

ONNX: paddle2onnx is tried on the host-NMS export and kept only if ONNX Runtime reproduces paddle.inference
within the gate's golden score tolerance; STACK.md found it mis-converts PaddleSlim QDQ weight scales, and the
recipe records what happened either way. The INT8 route for ONNX Runtime is ``compress.ort_quant``.

Settings: the run's train section (``load_run_spec``) under :data:`QAT_RECIPE` (the fixed values that make it
QAT), with the tunable ones from the compress section: ``qat_epochs``, ``qat_warmup_steps`` and the learning rate
``train.lr x compress.qat_lr_factor`` (a ``--lr`` given to ``defectkit train`` carries over).

Measured on the demo line (320 px, tiny, fine-tuned to mAP50-95 0.772; 2 epochs at lr 0.0004, 66-78 s/epoch on
2 busy cores): QAT 0.760 through paddle.inference (mAP50 0.998 vs 0.997), int8 weights 2.7 MB vs 8.4 MB; keeping the
stem conv in FP32 as well did not help (0.757). paddle2onnx's ONNX of it scored 0.746 and disagreed with
paddle.inference by 0.18 in score: not shipped.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from compress.finetune import train_without_checkpoints
from compress.variants import PARENT, Variant, settings_record
from detect.linespec import LineSpec
from detect.ppyoloe import RunPaths, activate, inference_config
from detect.settings import Settings
from edge_runtime.errors import ConfigError, DataError, ModelError
from edge_runtime.modelspec import ModelEntry, file_sha256

log = logging.getLogger("defectkit.qat")

VARIANT_NAME = "qat-int8"
TRAIN_DIR = "qat_train"  # the QAT session's run folder inside the variant directory
# paddleslim.dygraph.quant.QAT: int8, channel-wise weights, moving-average activation scales, QDQ export
QUANT_CONFIG: dict[str, Any] = {
    "weight_preprocess_type": None,
    "activation_preprocess_type": None,
    "weight_quantize_type": "channel_wise_abs_max",
    "activation_quantize_type": "moving_average_abs_max",
    "weight_bits": 8,
    "activation_bits": 8,
    "dtype": "int8",
    "window_size": 10000,
    "moving_rate": 0.9,
    "quantizable_layer_type": ["Conv2D", "Linear"],
    "fuse_conv_bn": False,
    "onnx_format": True,
}
# module-name prefixes kept in FP32 (see the module docstring)
KEEP_FP32_PREFIXES = ("yolo_head.pred_cls.", "yolo_head.proj_conv")
# QAT's recipe: the fixed train values that make this session QAT. They are the method, not defaults a line tunes
# (the tunable ones are compress.qat_epochs, compress.qat_lr_factor and compress.qat_warmup_steps in
# detect/defaults.yaml); applied over the run's train section.
QAT_RECIPE: dict[str, Any] = {
    "ema": False,  # exported = trained weights + the scales trained with them
    "mosaic": 0.0,  # a short fine-tune on the evaluation distribution (like close-mosaic)
    "mixup": 0.0,
    "eval_interval": 1,  # val mAP after every epoch (the recipe keeps them)
    "patience": 0,
    "time_budget_min": 0.0,
    "unfreeze_at_epoch": 0,
}
# BatchNorm normalises with its running statistics during QAT and never updates them (the fine-tune's statistics,
# estimated without quantization noise, are kept; training then sees what inference computes)
FREEZE_BN_STATS = True


def keep_fp32(model) -> list[str]:
    """Mark the layers that stay FP32 (``skip_quant = True``) and return their names."""
    from detect.heavy import paddle_stack

    nn = paddle_stack().paddle.nn
    kept = []
    for name, layer in model.named_sublayers():
        if isinstance(layer, (nn.Conv2D, nn.Linear)) and name.startswith(KEEP_FP32_PREFIXES):
            layer.skip_quant = True
            kept.append(name)
    return kept


def freeze_bn_stats(model) -> int:
    """``_use_global_stats = True`` on every BatchNorm (survives ppdet's ``model.train()``); returns the count."""
    from detect.heavy import paddle_stack

    norm = paddle_stack().paddle.nn.layer.norm._BatchNormBase
    layers = [m for m in model.sublayers() if isinstance(m, norm)]
    for m in layers:
        m._use_global_stats = True
    return len(layers)


def unbias_activation_scales(model) -> int:
    """Start every moving-average activation scale from zero state (returns how many).

    Paddle initialises them with ``accum = state = 1``, i.e. a prior abs-max of 1.0 weighted like one batch:
    after the few steps of a small line's QAT epoch the scales still lean towards 1.0 and clip real activations.
    With zeros, ``accum / state`` is the bias-corrected moving average of the observed abs-max from step one.
    """
    count = 0
    for layer in model.sublayers():
        if all(hasattr(layer, a) for a in ("_moving_rate", "_state", "_accum")):
            layer._state.set_value(layer._state.numpy() * 0)
            layer._accum.set_value(layer._accum.numpy() * 0)
            count += 1
    return count


def quantize_model(model) -> tuple[Any, Any, list[str]]:
    """(quantized model, ppdet QAT object, FP32 layer names): RepVgg fused, fake-quant layers inserted in place."""
    from ppdet.slim.quant import QAT

    kept = keep_fp32(model)
    if not any(k.startswith("yolo_head.pred_cls.") for k in kept):
        raise ModelError("QAT: the model has no 'yolo_head.pred_cls' convs to keep in FP32; is it a PP-YOLOE+ detector?")
    slim = QAT(quant_config=dict(QUANT_CONFIG), print_model=False)
    with contextlib.redirect_stdout(io.StringIO()):
        model = slim(model)  # convert_to_deploy() on RepVgg blocks, then paddleslim quantize
    return model, slim, kept


def qat_settings(spec: LineSpec, weights: Path, epochs: int, lr: float | None,
                 overrides: dict | None) -> Settings:
    """Settings of the QAT session: the run's < :data:`QAT_RECIPE`, ``epochs``, the compress section's warmup and
    learning rate (``lr``, else the run's ``train.lr x compress.qat_lr_factor``) < ``overrides`` (train keys)."""
    c = spec.settings.compress
    rate = float(lr) if lr is not None else spec.settings.train.lr * c.qat_lr_factor
    settings = spec.settings.with_values("train", **QAT_RECIPE, epochs=epochs, lr=rate,
                                         warmup_steps=c.qat_warmup_steps, pretrained=str(weights))
    return settings.with_values("train", **overrides) if overrides else settings


def _check_args(spec: LineSpec, weights: Path, epochs: Any, lr: float | None) -> None:
    where = spec.source or f"line '{spec.line}'"
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"QAT epochs must be a whole number >= 1, got {epochs!r} (compress.qat_epochs in {where} "
                          "or --set qat_epochs=2).")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ConfigError(f"QAT learning rate must be a number > 0, got {lr!r}.")
    if not Path(weights).is_file() or Path(weights).suffix != ".pdparams":
        raise ConfigError(f"QAT starts from fine-tuned weights: '{weights}' is not a .pdparams file. "
                          "Train first (`defectkit train LINE.yaml`) and pass runs/<line>/<run>/weights/best.pdparams.")


# ------------------------------------------------------------------------------------------------- training


def _train(spec: LineSpec, run: RunPaths, progress: bool) -> tuple[list[str], list[dict]]:
    """Build the kit's training session, quantize its model in place, train; returns (FP32 layers, history).

    ``spec`` carries the session's settings (:func:`qat_settings`)."""
    from ppdet.core.workspace import create

    from detect.freeze import apply_freeze, parse_freeze
    from detect.plots import read_history
    from detect.preflight import check_data, check_settings
    from detect.session import build_session

    check_settings(spec)
    check_data(spec)
    run.root.mkdir(parents=True, exist_ok=True)
    if run.history.exists():
        run.history.unlink()
    # freezing is applied after quantization (RepVgg fusion replaces the frozen convs with new ones)
    session = build_session(spec.with_settings(spec.settings.with_values("train", freeze="none")), run)
    trainer = session.trainer
    _, _, kept = quantize_model(trainer.model)
    if FREEZE_BN_STATS:
        freeze_bn_stats(trainer.model)
    unbias_activation_scales(trainer.model)
    freeze = apply_freeze(trainer.model, parse_freeze(spec.settings.train.freeze))
    session.freeze = session.cb.unfreezer.freeze_state = freeze
    # the optimizer was built on the pre-fusion parameters; rebuild it on the quantized model's
    trainer.optimizer = create("OptimizerBuilder")(trainer.lr, trainer.model)
    # QAT is short and not resumable: no full checkpoints (the best weights are still written every epoch)
    train_without_checkpoints(trainer, session, progress, "QAT")
    return kept, read_history(run.history)


# --------------------------------------------------------------------------------------------------- export


def _export(spec: LineSpec, state_file: Path, out_dir: Path, with_nms: bool, stem: str) -> Path:
    """Rebuild the quantized detector (NMS in the graph or not), load the QAT state, ``Trainer.export`` it."""
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    from ppdet.core.workspace import create
    from ppdet.engine import Trainer

    tmp = out_dir / f".tmp-{stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = inference_config(spec, RunPaths(tmp))
    cfg["exclude_nms"] = not with_nms
    live = activate(cfg)
    model, slim, _ = quantize_model(create(live["architecture"]))
    state = paddle.load(str(state_file))
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise ModelError(f"QAT weights {state_file} lack {len(missing)} tensors of the quantized model "
                         f"(first: {missing[:3]}); they were not written by compress.qat.")
    model.set_state_dict(state)
    live["model"], live["slim"], live["slim_type"] = model, slim, "QAT"
    produced = tmp / live["filename"]
    produced.mkdir(parents=True)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(live, mode="test")
        trainer.model.eval()
        # ppdet's export without its input-pruning trace (a second dygraph-to-static pass of the quantized model,
        # half the export time): PP-YOLOE reads only image and scale_factor, as ppdet's own PTQ export states
        _, full_spec = trainer._get_infer_cfg_and_input_spec(str(produced), prune_input=False)
        feeds = [{k: v for k, v in full_spec[0].items() if k in ("image", "scale_factor")}]
        slim.save_quantized_model(trainer.model, str(produced / "model"), input_spec=feeds)
    if not (produced / "model.pdmodel").is_file():
        raise ModelError(f"ppdet's QAT export wrote no model.pdmodel into '{produced}'.")
    for suffix in (".pdmodel", ".pdiparams"):
        shutil.move(str(produced / f"model{suffix}"), out_dir / f"{stem}{suffix}")
    shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / f"{stem}.pdmodel"


def strip_nms(src: Path, dst: Path) -> Path:
    """Save ``src``'s program cut before its ``multiclass_nms3`` op: outputs (boxes [N,A,4], scores [N,C,A]).

    That is exactly what ppdet exports with ``exclude_nms`` (measured: identical outputs), at a second instead
    of another dygraph-to-static trace of the quantized model.
    """
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    paddle.enable_static()
    try:
        exe = paddle.static.Executor(paddle.CPUPlace())
        with paddle.static.scope_guard(paddle.static.Scope()):
            program, feeds, _ = paddle.static.load_inference_model(str(src.with_suffix("")), exe)
            block = program.global_block()
            nms = [op for op in block.ops if op.type == "multiclass_nms3"]
            if len(nms) != 1:
                raise ModelError(f"{src}: expected one multiclass_nms3 op, found {len(nms)}.")
            outputs = [block.var(nms[0].input(name)[0]) for name in ("BBoxes", "Scores")]
            with paddle.utils.unique_name.guard("nonms_"):  # the loaded program owns the default scale names
                paddle.static.save_inference_model(str(dst.with_suffix("")), [block.var(n) for n in feeds], outputs,
                                                   exe, program=program, clip_extra=True)
    finally:
        paddle.disable_static()
    return dst


def program_quant_summary(pdmodel: Path) -> dict[str, Any]:
    """What an exported program quantizes: QDQ op counts and which convs read an int8 (dequantized) filter.

    A conv whose ``Filter`` is produced by ``dequantize_linear`` is INT8; one that reads a plain weight is FP32.
    """
    from detect.heavy import paddle_stack

    paddle_stack()
    from paddle.base.proto import framework_pb2

    program = framework_pb2.ProgramDesc()
    program.ParseFromString(Path(pdmodel).read_bytes())
    counts: dict[str, int] = {}
    dequantized: set[str] = set()
    shapes: dict[str, list[int]] = {}
    convs: list[tuple[str, str]] = []  # (op type, filter var)
    for block in program.blocks:
        for var in block.vars:
            if var.type.HasField("lod_tensor"):
                shapes[var.name] = list(var.type.lod_tensor.tensor.dims)
        for op in block.ops:
            counts[op.type] = counts.get(op.type, 0) + 1
            if op.type == "dequantize_linear":
                dequantized.update(a for o in op.outputs for a in o.arguments)
            if op.type in ("conv2d", "depthwise_conv2d"):
                filt = next(a for i in op.inputs if i.parameter == "Filter" for a in i.arguments)
                convs.append((op.type, filt))
    fp32 = [{"filter": f, "shape": shapes.get(f)} for _, f in convs if f not in dequantized]
    return {"quantize_linear": counts.get("quantize_linear", 0), "dequantize_linear": counts.get("dequantize_linear", 0),
            "convs": len(convs), "int8_convs": len(convs) - len(fp32), "fp32_convs": fp32}


def _onnx_entry(path: Path) -> ModelEntry:
    import paddle2onnx

    return ModelEntry(file=path.name, format="onnx", target="any", precision="int8", nms="host",
                      runtime_version=f"paddle2onnx {paddle2onnx.__version__}",
                      sha256=file_sha256(path))


def _try_onnx(spec: LineSpec, pdmodel: Path, images: list[Path],
              write_deploy: Callable[[list[ModelEntry]], None]) -> tuple[Path | None, dict[str, Any]]:
    """paddle2onnx on the QAT export, kept only if ONNX Runtime reproduces paddle.inference on ``images``.

    ``write_deploy(extra)`` writes the deploy.json listing the ONNX file too (the edge runtime loads nothing without it).
    """
    import numpy as np
    import paddle2onnx

    from compress.gate import gate_settings
    from compress.measure import evaluate_model, read_image
    from edge_runtime.predict import Detector
    from edge_runtime.preprocess import model_feeds

    dst = pdmodel.with_suffix(".onnx")
    report: dict[str, Any] = {"tool": f"paddle2onnx {paddle2onnx.__version__}", "converted": False, "shipped": False}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            paddle2onnx.export(str(pdmodel), str(pdmodel.with_suffix(".pdiparams")), str(dst),
                               opset_version=max(13, spec.settings.export.opset),
                               enable_onnx_checker=True, verbose=False)
        if not dst.is_file():
            raise ModelError("paddle2onnx wrote no file")
        report["converted"] = True
        write_deploy([_onnx_entry(dst)])
        paddle_det = Detector.from_model(pdmodel, backend="paddle")
        onnx_det = Detector.from_model(dst, backend="onnxruntime")
    except Exception as exc:  # any failure of the conversion is a finding to record, not a reason to stop
        dst.unlink(missing_ok=True)
        report["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return None, report
    _, tol, _ = gate_settings(spec)
    score_diff = box_diff = top_score = 0.0
    for path in images:
        img = read_image(path)
        a = paddle_det.backend.infer(model_feeds(img, paddle_det.spec.input, paddle_det.backend.input_names))
        b = onnx_det.backend.infer(model_feeds(img, onnx_det.spec.input, onnx_det.backend.input_names))
        boxes_a, scores_a = (np.asarray(x) for x in a[:2])
        boxes_b, scores_b = (np.asarray(x) for x in b[:2])
        score_diff = max(score_diff, float(np.abs(scores_a - scores_b).max()))
        top_score = max(top_score, float(scores_a.max()))
        live = scores_a.max(axis=1).reshape(-1) >= tol.min_score  # anchors that could become detections
        if live.any():
            box_diff = max(box_diff, float(np.abs(boxes_a.reshape(-1, 4)[live] - boxes_b.reshape(-1, 4)[live]).max()))
    agree = score_diff <= tol.score and box_diff <= max(tol.box_px, tol.box_rel * spec.image_size)
    ok = agree and top_score >= tol.min_score
    report.update({"images": len(images), "max_score_diff_vs_paddle": round(score_diff, 6),
                   "max_box_diff_px_vs_paddle": round(box_diff, 4), "score_tol": tol.score,
                   "map50_95_onnxruntime": round(evaluate_model(dst, spec, backend="onnxruntime",
                                                                progress=False).map50_95, 4),
                   "shipped": ok})
    if not ok:
        dst.unlink(missing_ok=True)
        report["reason"] = (
            f"ONNX Runtime disagrees with paddle.inference on the same QAT model (max score diff {score_diff:.3f} "
            f"vs tolerance {tol.score}, boxes off by up to {box_diff:.1f} px): paddle2onnx mis-converts PaddleSlim "
            "QDQ models (STACK.md); use ort-int8 for ONNX Runtime" if not agree else
            f"cannot be verified: the model scores nothing above {tol.min_score} on {len(images)} val images, so an "
            "agreement with paddle.inference proves nothing; not shipped")
        return None, report
    return dst, report


def _val_images(spec: LineSpec, count: int) -> list[Path]:
    from detect.data.coco import load_coco

    coco = load_coco(spec.paths.val)
    images = [spec.paths.images / im["file_name"] for im in coco["images"]]
    if not images:
        raise DataError(f"{spec.paths.val} lists no images: QAT is evaluated on the line's val set.")
    return images[:: max(1, len(images) // count)][:count]


# ------------------------------------------------------------------------------------------------ public API


def qat(spec: LineSpec, weights: Path, out_dir: Path, *, epochs: int = 2, lr: float | None = None,
        overrides: dict | None = None, progress: bool = True, run_root: Path | None = None) -> Variant:
    """QAT ``epochs`` epochs from ``weights``; export the best epoch into ``out_dir`` (deploy.json); the variant.

    ``spec`` is the run's (``load_run_spec``). ``lr`` defaults to the run's ``train.lr x compress.qat_lr_factor``;
    ``overrides`` are train settings (``detect/defaults.yaml`` train section) applied last. ``run_root``: the run
    the weights come from (its settings.yaml is named in the variant's settings record). The training session
    lives in ``out_dir/qat_train`` (history, log, weights).
    """
    from detect.export import deploy_spec, paddle_version
    from detect.heavy import paddle_stack

    weights, out_dir = Path(weights), Path(out_dir)
    _check_args(spec, weights, epochs, lr)
    qat_spec = spec.with_settings(qat_settings(spec, weights, epochs, lr, overrides))
    train = qat_spec.settings.train
    paddle_stack()
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("model*.pd*")) + list(out_dir.glob("model*.onnx")):
        old.unlink()  # a previous attempt's files must not be mistaken for this one's
    run = RunPaths(out_dir / TRAIN_DIR)
    start = time.time()
    kept, history = _train(qat_spec, run, progress)
    train_seconds = time.time() - start
    evaluated = [h for h in history if "map50_95" in h]
    if not evaluated or not run.best_weights.is_file():
        raise ModelError(f"QAT training in {run.root} evaluated no epoch (see {run.log}); nothing to export.")
    best = max(evaluated, key=lambda h: h["map50_95"])

    entries: list[ModelEntry] = []
    with_nms: dict[str, Any] = {"exported": False}
    try:  # one slow trace (NMS in the graph); the host-NMS model is that program cut before its NMS op
        nms_model = _export(spec, run.best_weights, out_dir, with_nms=True, stem="model")
        nonms = strip_nms(nms_model, out_dir / "model_nonms.pdmodel")
        with_nms = {"exported": True, "model_nonms": "model.pdmodel cut before multiclass_nms3"}
    except Exception as exc:  # the host-NMS model is the one that matters: export it directly instead
        with_nms["reason"] = f"{type(exc).__name__}: {exc}"[:300]
        log.warning("QAT export with NMS in the graph failed (%s); exporting without NMS", with_nms["reason"])
        for old in out_dir.glob("model.pd*"):
            old.unlink()
        nonms = _export(spec, run.best_weights, out_dir, with_nms=False, stem="model_nonms")
    summary = program_quant_summary(nonms)
    if not summary["dequantize_linear"]:
        raise ModelError(f"{nonms}: the QAT export holds no quantize/dequantize ops; PaddleSlim did not quantize it.")
    entries.append(ModelEntry(file=nonms.name, format="paddle", target="any", precision="int8", nms="host",
                              runtime_version=paddle_version(), sha256=file_sha256(nonms)))
    if with_nms["exported"]:
        entries.append(ModelEntry(file="model.pdmodel", format="paddle", target="any", precision="int8",
                                  nms="in_model", runtime_version=paddle_version(),
                                  sha256=file_sha256(out_dir / "model.pdmodel")))
    meta = {"source_weights": str(weights), "method": "qat", "qat_weights": str(run.best_weights)}

    def write_deploy(extra: list[ModelEntry] = ()) -> None:
        deploy_spec(spec, entries + list(extra), meta).save(out_dir)

    onnx_file, onnx_report = _try_onnx(spec, nonms, _val_images(spec, 4), write_deploy)
    write_deploy([_onnx_entry(onnx_file)] if onnx_file is not None else [])
    if run.checkpoints.is_dir():
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    epochs_run = len([h for h in history if "train_seconds" in h])
    recipe = {
        "tool": "ppdet.slim.QAT (paddleslim.dygraph.quant.QAT)",
        "epochs": epochs, "epochs_run": epochs_run, "lr": train.lr, "batch_size": train.batch_size,
        "lr_rule": "given" if lr is not None else "overrides" if "lr" in (overrides or {}) else
        f"train.lr {spec.settings.train.lr} x compress.qat_lr_factor {spec.settings.compress.qat_lr_factor}",
        "freeze": train.freeze, "bn_stats": "frozen" if FREEZE_BN_STATS else "updated", "from_weights": str(weights),
        "quant_config": {k: v for k, v in QUANT_CONFIG.items() if v is not None},
        "format": "QDQ (quantize_linear/dequantize_linear), int8 channel-wise weights",
        "kept_fp32": kept, "kept_fp32_rule": "module prefixes " + ", ".join(KEEP_FP32_PREFIXES),
        "program": {k: v for k, v in summary.items() if k != "fp32_convs"} | {
            "fp32_conv_shapes": [c["shape"] for c in summary["fp32_convs"]]},
        "val_per_epoch": [{"epoch": h["epoch"], "map50_95": round(h["map50_95"], 4), "map50": round(h["map50"], 4)}
                          for h in evaluated],
        "best_epoch": best["epoch"],
        "seconds_per_epoch": [h["train_seconds"] for h in history if "train_seconds" in h],
        "total_seconds": round(train_seconds, 1),
        "with_nms": with_nms, "onnx": onnx_report,
    }
    return Variant(name=VARIANT_NAME, method="qat", parent=PARENT, export_dir=out_dir.resolve(), recipe=recipe,
                   settings=settings_record(run_root, spec, qat_spec.settings.to_dict()["train"]))


__all__ = ["qat", "quantize_model", "keep_fp32", "freeze_bn_stats", "strip_nms", "program_quant_summary", "qat_settings", "QUANT_CONFIG", "QAT_RECIPE",
           "KEEP_FP32_PREFIXES", "VARIANT_NAME"]
