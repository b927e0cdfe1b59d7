"""Grow a trained PP-YOLOE+ classification head to more classes without touching what it already knows.

ppdet's ``load_pretrain_weight`` skips every tensor whose shape differs, so loading a 5-class model into a
6-class one would re-initialise the whole classifier: every old class forgotten before training starts.
Here the parent's rows are copied into the grown tensors and only the appended rows get PP-YOLOE's own
initialisation (weight 0, bias = the prior of ``bias_init_with_prob(0.01)``, as ``PPYOLOEHead._init_weights``).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edge_runtime.errors import ConfigError

CLASS_HEAD = re.compile(r"^yolo_head\.pred_cls\.\d+\.(weight|bias)$")
"""The only tensors whose first axis is the class axis in PP-YOLOE+ (checked: no other tensor changes shape)."""


def grow_class_rows(stored: dict[str, np.ndarray], old: int, new: int, prior: float = 0.01) -> dict[str, np.ndarray]:
    """``stored`` with every class-head tensor grown from ``old`` to ``new`` rows (a new dict; arrays copied)."""
    if new < old:
        raise ConfigError(f"a retrain cannot drop classes ({old} -> {new}): the edge box's class ids would change.")
    bias = float(-np.log((1.0 - prior) / prior))  # ppdet.modeling.initializer.bias_init_with_prob
    out, grown = {}, 0
    for key, value in stored.items():
        arr = np.asarray(value)
        if CLASS_HEAD.match(key):
            if arr.shape[0] != old:
                raise ConfigError(f"parent weights: {key} has {arr.shape[0]} class rows, the parent line has {old} "
                                  f"classes. These weights are not the parent run's model.")
            extra = np.zeros((new - old,) + arr.shape[1:], arr.dtype)
            if key.endswith(".bias"):
                extra[:] = bias
            arr = np.concatenate([arr, extra], axis=0)
            grown += 1
        out[key] = arr
    if not grown:
        raise ConfigError("parent weights hold no PP-YOLOE+ classification head (yolo_head.pred_cls.*).")
    return out


def first_classes_model(weights: Path, n: int, dst: Path) -> Path:
    """A detector of only the first ``n`` classes of ``weights`` (class-head rows cut): the parent of a line
    that has not met the other classes yet, for the retrain benchmark and tests."""
    from detect.callbacks import save_state_atomic
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    stored = paddle.load(str(weights))
    save_state_atomic({k: paddle.to_tensor(v.numpy()[:n]) if CLASS_HEAD.match(k) else v for k, v in stored.items()}, dst)
    return dst


def write_grown_weights(parent_weights: Path, old: int, new: int, dst: Path) -> Path:
    """The parent's ``.pdparams`` with its class head grown to ``new`` classes, saved to ``dst`` (atomically)."""
    from detect.callbacks import save_state_atomic
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    stored = {k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in paddle.load(str(parent_weights)).items()}
    grown = grow_class_rows(stored, old, new)
    save_state_atomic({k: paddle.to_tensor(v) for k, v in grown.items()}, dst)
    return dst
