"""Elastic weight consolidation for a retrain: the parent's Fisher information, computed once, kept in its run.

``fisher.pdparams`` in the parent's run folder holds, per trainable tensor, the mean squared gradient of the
parent's own detection loss on its own training data (``retrain.ewc_batches`` batches of the kit's training
transforms without Mosaic or multi-scale; BN on running statistics, as the parent runs), divided by the mean over
all tensors so that ``retrain.ewc`` has the same meaning for every model. ``fisher.json`` beside it records the
parent weights' sha256 it belongs to: other weights (or another batch count) compute it again; otherwise every
later retrain of that parent reuses it.
The gradient is taken per batch (the usual empirical-Fisher shortcut), not per image.
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import ConfigError
from edge_runtime.fileio import atomic_write_json

FISHER = "fisher.pdparams"
FISHER_META = "fisher.json"


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fisher_files(parent_run: Path) -> tuple[Path, Path]:
    return Path(parent_run) / FISHER, Path(parent_run) / FISHER_META


def ensure_fisher(parent, batches: int, quiet: bool = False, freeze: str = "none") -> tuple[Path, str]:
    """The parent's Fisher file, computed now if it is missing or was made for other weights / batches / frozen
    layers. ``freeze``: what the retrain keeps frozen (``retrain.freeze``, or "none" when it thaws layers later): a
    frozen tensor cannot drift, so it needs no Fisher, and its backward pass is skipped (measured on PP-YOLOE+ tiny:
    the backward through the backbone was most of the Fisher's cost). Returns (path, note) where the note says
    whether it was reused or computed."""
    path, meta_path = fisher_files(parent.run.root)
    weights_sha = _sha256(parent.weights)
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if (meta.get("weights_sha256"), meta.get("batches"), meta.get("freeze", "none")) == (weights_sha, batches,
                                                                                             str(freeze)):
            return path, f"reused {path} (computed {meta.get('created')})"
    if not quiet:
        print(f"EWC: no Fisher information for {parent.weights} yet: computing it on {batches} batches of the "
              f"parent's training data (once; kept in {path})")
    fisher, used = compute_fisher(parent.spec, parent.weights, batches, freeze)
    from detect.callbacks import save_state_atomic
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    save_state_atomic({k: paddle.to_tensor(v) for k, v in fisher.items()}, path)
    atomic_write_json(meta_path, {"weights": str(parent.weights), "weights_sha256": weights_sha, "batches": batches,
                                  "batches_used": used, "tensors": len(fisher), "freeze": str(freeze),
                                  "normalisation": "divided by the mean over all tensors (the trainable ones)",
                                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return path, f"computed {path} on {used} batches"


def compute_fisher(spec, weights: Path, batches: int, freeze: str = "none") -> tuple[dict[str, np.ndarray], int]:
    """Mean squared batch gradient of the detection loss per tensor of ``weights`` on ``spec``'s training data
    (the tensors ``freeze`` leaves trainable)."""
    from detect.freeze import apply_freeze, parse_freeze
    from detect.heavy import paddle_stack
    from detect.mkl import prefer_mkl_avx2

    # the retrain computes this before its training session starts: MKL picks its kernels at its first call, so
    # the session's AVX2 switch must come first here, or the whole process keeps MKL's slow generic path on AMD
    # (measured: every later training of the process 1.5x slower)
    prefer_mkl_avx2(spec.settings.train.mkl_avx2_on_amd)
    from detect.ppyoloe import RunPaths, activate, build_config
    from detect.seeded_loader import install_seeded_loader

    paddle = paddle_stack().paddle
    from ppdet.engine import Trainer
    from ppdet.utils.checkpoint import load_pretrain_weight

    train = spec.settings.train
    plain = spec.with_settings(spec.settings.with_values(
        "train", mosaic=0.0, mixup=0.0, multiscale=False, visualdl=False, workers=0, freeze="none", pretrained=""))
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        cfg = build_config(plain, RunPaths(Path(tmp)))
        trainer = Trainer(activate(cfg), mode="train")
        loader = install_seeded_loader(trainer, train.seed)
        model = trainer.model
        load_pretrain_weight(model, str(weights)[: -len(".pdparams")])
        apply_freeze(model, parse_freeze(freeze, "retrain.freeze"))
        model.train()
        for bn in [m for m in model.sublayers() if isinstance(m, paddle.nn.layer.norm._BatchNormBase)]:
            bn.eval()  # the parent as it runs: running statistics
        params = {n: p for n, p in model.named_parameters() if not p.stop_gradient}
        acc = {n: np.zeros(p.shape, "float64") for n, p in params.items()}
        used, epoch = 0, 0
        if len(loader) == 0:
            raise ConfigError(f"EWC: the parent's training set {spec.paths.train} has fewer images than one batch "
                              f"({train.batch_size}); set retrain.ewc 0.")
        while used < batches:
            for data in loader.loader(epoch):
                data["epoch_id"] = 10 ** 6  # the task-aligned assigner the parent finished with
                loss = model(data)["loss"]
                loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        acc[n] += np.square(p.grad.numpy().astype("float64"))
                model.clear_gradients()
                used += 1
                if used >= batches:
                    break
            epoch += 1
    acc = {n: a / used for n, a in acc.items()}
    mean = float(np.mean([a.mean() for a in acc.values()])) or 1.0
    return {n: (a / mean).astype("float32") for n, a in acc.items()}, used


def load_fisher(path: Path, parent_weights: Path, model) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Fisher, parent tensors) for the student's trainable tensors, as paddle tensors; class-head tensors keep
    their old rows only (the parent's shape)."""
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    if not Path(path).is_file():
        raise ConfigError(f"EWC: Fisher file {path} is missing; start the retrain again (it is computed once).")
    fisher, parent = paddle.load(str(path)), paddle.load(str(parent_weights))
    out_f, out_a = {}, {}
    for name, p in model.named_parameters():
        if name not in fisher or name not in parent:
            continue
        f, a = fisher[name], parent[name]
        if list(f.shape) != list(a.shape) or list(f.shape)[1:] != list(p.shape)[1:] or f.shape[0] > p.shape[0]:
            raise ConfigError(f"EWC: {path} does not belong to the parent weights {parent_weights} ({name}: "
                              f"{list(f.shape)} vs {list(a.shape)}); delete it to compute it again.")
        out_f[name] = paddle.to_tensor(f.numpy())
        out_a[name] = paddle.to_tensor(a.numpy())
        out_f[name].stop_gradient = out_a[name].stop_gradient = True
    return out_f, out_a
