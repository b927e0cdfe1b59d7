"""Structured filter pruning of a live PP-YOLOE+ detector (PaddleSlim), and the model surgery around it.

PaddleSlim's dygraph filter pruners trace a layer into a program, group the convs whose output channels must
shrink together ("collections", each led by a *master* conv) and cut the same filters from every member. On
PP-YOLOE+ three things need help (STACK.md, re-measured here):

- ``RepVggBlock.forward`` computes ``alpha * conv2(x)``: a [1] parameter on the left of the multiply makes the
  pruner's shape walk follow ``alpha`` instead of the conv output, and the collection breaks. :func:`patch_repvgg`
  swaps the instance's forward for the same arithmetic written ``conv2(x) * alpha``.
- The backbone and the neck are traced separately, and a traced part's outputs are read outside the trace
  (neck / head). A collection whose pruning would change the part's output shapes would break the consumer;
  those are found by measurement (:func:`safe_masters`: prune each alone, run the part, compare shapes), not by a
  kept list. PaddleSlim also stops at ``concat`` (the CSP stages), which simply leaves those convs whole.
- ``RepVggBlock.convert_to_deploy`` builds its fused conv from ``ch_in``/``ch_out`` (not updated by the pruner)
  and deletes its branches (calling it twice fails): :func:`to_deploy` sets them from the pruned weights and
  converts once under ``paddle.utils.unique_name.guard``, then makes later calls (ppdet's export) no-ops.
"""
from __future__ import annotations

import contextlib
import io
import logging
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge_runtime.errors import ModelError, UserInputError

log = logging.getLogger("defectkit.prune")

CRITERIA = ("fpgm", "l1")
PARTS = ("backbone", "neck")  # traced and pruned separately, in this order
MAX_RATIO = 0.9  # highest uniform filter ratio the FLOPs search may use
SEARCH_STEPS = 12  # bisection steps of the ratio search (2^-12 of the ratio range)
BACKUP_SUFFIX = "_backup"  # PaddleSlim keeps the unpruned values in buffers named <param>_backup


def _paddle():
    from detect.heavy import paddle_stack

    return paddle_stack().paddle


def _repvgg_forward(self, x):
    """``RepVggBlock.forward`` with ``conv2(x) * alpha`` instead of ``alpha * conv2(x)`` (same values)."""
    if hasattr(self, "conv"):
        y = self.conv(x)
    elif self.alpha is not None:
        y = self.conv1(x) + self.conv2(x) * self.alpha
    else:
        y = self.conv1(x) + self.conv2(x)
    return self.act(y)


def repvgg_blocks(model) -> list:
    from ppdet.modeling.backbones.cspresnet import RepVggBlock

    return [m for m in model.sublayers() if isinstance(m, RepVggBlock)]


def patch_repvgg(model) -> int:
    """Give every RepVggBlock of ``model`` the pruner-friendly forward (instance attribute); returns the count.

    An instance patch rather than a subclass: the blocks already exist inside a built (and loaded) detector.
    """
    blocks = repvgg_blocks(model)
    for block in blocks:
        block.forward = types.MethodType(_repvgg_forward, block)
    return len(blocks)


def detector_inputs(size: int) -> list[dict]:
    """Dummy feeds of a whole PP-YOLOE detector (what ppdet's own slim pruner traces with)."""
    paddle = _paddle()
    return [{"image": paddle.ones([1, 3, size, size], dtype="float32"),
             "im_shape": paddle.full([1, 2], float(size), dtype="float32"),
             "scale_factor": paddle.ones([1, 2], dtype="float32")}]


@contextlib.contextmanager
def eval_mode(model):
    """Evaluation mode for a while (BN must not update its statistics on dummy inputs), then back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def gflops_of(model, size: int) -> float:
    """FLOPs of ``model`` in GFLOPs at ``size`` px, PaddleSlim's count (``paddle.flops`` leaves it in train mode)."""
    from paddleslim.analysis import dygraph_flops

    with eval_mode(model), contextlib.redirect_stdout(io.StringIO()):
        return float(dygraph_flops(model, detector_inputs(size))) / 1e9


def params_m_of(model) -> float:
    return sum(int(p.numel()) for p in model.parameters()) / 1e6


# ----------------------------------------------------------------------------------------------- pruning


@dataclass
class _Part:
    """One traced part of the detector (backbone or neck) with its pruner and its prunable masters."""

    name: str
    layer: Any
    pruner: Any
    masters: list[str]
    excluded: list[str] = field(default_factory=list)  # collections that would change the part's outputs


def _shapes(out) -> list[list[int]]:
    return [list(t.shape) for t in (out if isinstance(out, (list, tuple)) else [out])]


def safe_masters(layer, pruner, call: Callable[[], Any]) -> tuple[list[str], list[str]]:
    """(masters safe to prune, masters whose pruning changes ``layer``'s output shapes), by trial pruning."""
    base = _shapes(call())
    safe, unsafe = [], []
    for collection in pruner.collections:
        name = collection.master_name
        plan = pruner.prune_var(name, 0, 0.5, apply=None)
        plan.apply(layer, lazy=False)
        try:
            same = _shapes(call()) == base
        except Exception:  # the part no longer runs at all: certainly not safe
            same = False
        plan.restore(layer)
        (safe if same else unsafe).append(name)
    return safe, unsafe


def build_parts(model, size: int, criterion: str) -> list[_Part]:
    """Pruners for the backbone and the neck of ``model`` (patched RepVgg), with their safe masters."""
    from paddleslim.dygraph import FPGMFilterPruner, L1NormFilterPruner

    paddle = _paddle()
    cls = {"fpgm": FPGMFilterPruner, "l1": L1NormFilterPruner}[criterion]
    patch_repvgg(model)
    parts = []
    with eval_mode(model), _quiet_paddleslim():
        image = paddle.ones([1, 3, size, size], dtype="float32")
        feats = [paddle.ones(f.shape, dtype="float32") for f in model.backbone({"image": image})]
        calls = {"backbone": ([{"image": image}], lambda: model.backbone({"image": image})),
                 "neck": ([feats], lambda: model.neck(feats))}
        for name in PARTS:
            layer = getattr(model, name)
            inputs, call = calls[name]
            pruner = cls(layer, inputs)
            safe, unsafe = safe_masters(layer, pruner, call)
            parts.append(_Part(name, layer, pruner, safe, unsafe))
    if not any(p.masters for p in parts):
        raise ModelError("PaddleSlim found no prunable conv in the backbone or neck; is this a PP-YOLOE+ detector?")
    return parts


@contextlib.contextmanager
def _quiet_paddleslim():
    """PaddleSlim logs every collection at INFO and its graph walk at WARNING (hundreds of lines per search)."""
    loggers = [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict) if n.startswith("paddleslim")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def apply_ratio(parts: list[_Part], ratio: float, opt=None) -> list:
    """Prune every safe master of every part by ``ratio``; returns the applied plans (restorable)."""
    plans = []
    with _quiet_paddleslim():
        for part in parts:
            if part.masters:
                part.pruner.opt = opt
                plans.append((part, part.pruner.prune_vars({m: ratio for m in part.masters}, 0)))
    return plans


def restore(plans: list) -> None:
    for part, plan in reversed(plans):
        plan.restore(part.layer, opt=part.pruner.opt)


def search_ratio(model, parts: list[_Part], size: int, target: float, base_gflops: float,
                 progress: bool = False) -> tuple[float, float]:
    """Smallest uniform ratio whose pruning removes at least ``target`` of the FLOPs: (ratio, reduction).

    Bisection over the ratio (the reduction grows with it, in steps: filters are whole). The model is left
    unpruned. Refuses a target beyond what :data:`MAX_RATIO` reaches.
    """
    def reduction(ratio: float) -> float:
        plans = apply_ratio(parts, ratio)
        try:
            return 1.0 - gflops_of(model, size) / base_gflops
        finally:
            restore(plans)

    top = reduction(MAX_RATIO)
    if top < target:
        raise UserInputError(f"a FLOPs target of -{target:.0%} is out of reach: pruning every prunable backbone and "
                             f"neck conv by {MAX_RATIO:.0%} removes {top:.1%} of the FLOPs. Ask for at most "
                             f"{int(top * 100)} % (compress.prune_flops={int(top * 100) / 100}).")
    lo, hi, hi_red = 0.0, MAX_RATIO, top
    steps = range(SEARCH_STEPS)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="prune: ratio search", unit="step", leave=False)
    for _ in steps:
        mid = (lo + hi) / 2
        red = reduction(mid)
        if red >= target:
            hi, hi_red = mid, red
        else:
            lo = mid
    return round(hi, 4), hi_red


def drop_backups(model) -> int:
    """Delete PaddleSlim's ``*_backup`` buffers (unpruned copies) so they stay out of state dicts and the EMA."""
    count = 0
    for layer in model.sublayers(include_self=True):
        for name in [n for n in layer._buffers if n.endswith(BACKUP_SUFFIX)]:
            del layer._buffers[name]
            count += 1
    return count


def pruned_layers(model, before: dict[str, list[int]]) -> list[str]:
    """Names of the convs whose weight shape differs from ``before`` (name -> shape)."""
    return [n for n, p in model.named_parameters()
            if n.endswith(".weight") and len(p.shape) == 4 and list(p.shape) != before.get(n)]


# ----------------------------------------------------------------------------------------- pruned weights


def load_state(model, state: dict[str, Any], source: str | Path) -> None:
    """Load a state dict whose tensors may be smaller than ``model``'s (a pruned model) into ``model``.

    ``set_state_dict`` refuses other shapes; the tensors are replaced in place the way PaddleSlim prunes them.
    """
    import numpy as np

    paddle = _paddle()
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ModelError(f"weights {source} lack {len(missing)} tensors of the detector (first: {missing[:3]}); "
                         "are they PP-YOLOE+ weights of this line's model size?")
    for key, tensor in own.items():
        value = state[key]
        value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        tensor.value().get_tensor().set(value.astype(np.float32) if value.dtype == np.float64 else value,
                                        paddle.CPUPlace())


def to_deploy(model) -> int:
    """Fuse every RepVggBlock once (pruned shapes respected); later ``convert_to_deploy`` calls do nothing."""
    paddle = _paddle()
    blocks = repvgg_blocks(model)
    with paddle.utils.unique_name.guard("prune_deploy_"):
        for block in blocks:
            if hasattr(block, "conv"):
                continue
            out_ch, in_ch = block.conv1.conv.weight.shape[:2]
            block.ch_in, block.ch_out = int(in_ch), int(out_ch)
            block.convert_to_deploy()
            block.convert_to_deploy = types.MethodType(lambda self: None, block)
    return len(blocks)


def build_detector(spec, weights: str | Path | None = None, exclude_nms: bool = False):
    """A PP-YOLOE+ detector of ``spec`` in eval mode, with (possibly pruned) ``weights`` loaded."""
    from detect.ppyoloe import RunPaths, activate, inference_config

    paddle = _paddle()
    from ppdet.core.workspace import create

    cfg = inference_config(spec, RunPaths(Path(".")))
    cfg["exclude_nms"] = exclude_nms
    live = activate(cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        model = create(live["architecture"])
    if weights is not None:
        load_state(model, paddle.load(str(weights)), weights)
    model.eval()
    return model


__all__ = ["CRITERIA", "PARTS", "MAX_RATIO", "patch_repvgg", "build_parts", "apply_ratio", "restore", "search_ratio",
           "drop_backups", "gflops_of", "params_m_of", "load_state", "to_deploy", "build_detector", "eval_mode",
           "pruned_layers", "detector_inputs"]
