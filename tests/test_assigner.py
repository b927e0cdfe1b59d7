"""Label assignment for boxes thinner than the finest stride (detect/assigner.py), on real ppdet tensors.

A pin-hole or hair-line crack narrower than 8 px at the model input can lie between anchor points; ppdet's
task-aligned assigner then gives it no positive at all. The kit's assigner gives it the anchors near its
centre and assigns every other box exactly as ppdet does.
"""
from __future__ import annotations

import zlib  # noqa: F401  -- before paddle (import-order segfault, STACK.md)
from pathlib import Path

import numpy as np
import pytest

from detect.heavy import paddle_stack

STRIDES = [32, 16, 8]
SIZE = 64


def anchors(size: int = SIZE):
    """Anchor points (cell centres, levels in the head's order) and anchors per level, as PP-YOLOE makes them."""
    paddle = paddle_stack().paddle
    points, counts = [], []
    for s in STRIDES:
        n = size // s
        ys, xs = paddle.meshgrid(paddle.arange(n, dtype="float32"), paddle.arange(n, dtype="float32"))
        points.append((paddle.stack([xs.flatten(), ys.flatten()], -1) + 0.5) * s)
        counts.append(n * n)
    return paddle.concat(points), counts


def assign(assigner, boxes: list[list[float]], labels: list[int], num_classes: int = 3, seed: int = 0):
    """Run an assigner on one image's boxes with seeded random predictions; numpy outputs."""
    paddle = paddle_stack().paddle
    points, counts = anchors()
    rng = np.random.default_rng(seed)
    n = points.shape[0]
    scores = paddle.to_tensor(rng.uniform(0.05, 0.95, (1, n, num_classes)).astype("float32"))
    half = paddle.to_tensor(rng.uniform(3, 20, (1, n, 2)).astype("float32"))
    pred = paddle.concat([points.unsqueeze(0) - half, points.unsqueeze(0) + half], -1)
    gt = paddle.to_tensor(np.asarray([boxes], dtype="float32"))
    gt_labels = paddle.to_tensor(np.asarray([labels], dtype="int32")[..., None])
    mask = paddle.ones([1, len(boxes), 1])
    out = assigner(scores, pred, points, counts, gt_labels, gt, mask, num_classes)
    return [t.numpy() for t in out], points.numpy()


def kit_assigner(radius: float = 1.0):
    paddle_stack()
    from detect.assigner import NearCentreTaskAlignedAssigner

    return NearCentreTaskAlignedAssigner(center_radius=radius, fpn_strides=STRIDES)


def ppdet_assigner():
    paddle_stack()
    from ppdet.modeling.assigners.task_aligned_assigner import TaskAlignedAssigner

    return TaskAlignedAssigner()


PINHOLE = [13.0, 13.0, 16.0, 16.0]  # 3 px, between the stride-8 anchor points at 12 and 20
LARGE = [20.0, 22.0, 52.0, 50.0]


def test_a_box_between_anchor_points_gets_positives_near_its_centre() -> None:
    (labels, boxes, scores, positive), points = assign(kit_assigner(), [PINHOLE, LARGE], [2, 0])
    mine = positive[0, 0] > 0
    assert mine.sum() >= 1
    centre = np.array([14.5, 14.5])
    stride = np.concatenate([np.full((SIZE // s) ** 2, s) for s in STRIDES])
    assert (np.abs(points[mine] - centre).max(axis=1) < stride[mine]).all()  # within one stride of its centre
    assert (labels[0, mine] == 2).all()  # its class, its own box as the target
    np.testing.assert_allclose(boxes[0, mine], np.tile(PINHOLE, (int(mine.sum()), 1)))
    assert scores[0, mine, 2].max() > 0  # soft target: its best positive scores its best IoU, as in ppdet

    (ppdet_labels, *_, ppdet_positive), _ = assign(ppdet_assigner(), [PINHOLE, LARGE], [2, 0])
    assert ppdet_positive[0, 0].sum() == 0 and not (ppdet_labels == 2).any()  # ppdet: background everywhere
    (_, _, _, off), _ = assign(kit_assigner(radius=0.0), [PINHOLE, LARGE], [2, 0])
    assert off[0, 0].sum() == 0  # radius 0 is ppdet's rule


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_boxes_with_an_anchor_inside_are_assigned_exactly_as_ppdet_does(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    xy = rng.uniform(0, 40, (4, 2))
    wh = rng.uniform(10, 24, (4, 2))  # wider than the finest stride: an anchor point always inside
    boxes = np.concatenate([xy, np.minimum(xy + wh, SIZE)], 1).tolist()
    labels = rng.integers(0, 3, 4).tolist()
    kit, _ = assign(kit_assigner(), boxes, labels, seed=seed)
    ref, _ = assign(ppdet_assigner(), boxes, labels, seed=seed)
    for a, b in zip(kit, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_model_trains_with_the_kit_assigner_and_no_atss_phase_from_pretrained_weights(tiny_spec) -> None:
    from detect.ppyoloe import RunPaths, activate, build_config

    pretrained = tiny_spec.with_settings(tiny_spec.settings.with_values("train", pretrained="base.pdparams"))
    cfg = build_config(pretrained, RunPaths(Path("x")))
    assert cfg["PPYOLOEHead"]["static_assigner_epoch"] == 0  # ATSS only before predictions mean anything
    scratch = build_config(tiny_spec.with_settings(tiny_spec.settings.with_values("train", pretrained="")),
                           RunPaths(Path("x")))
    assert scratch["PPYOLOEHead"]["static_assigner_epoch"] == tiny_spec.settings.train.epochs // 4
    pinned = tiny_spec.with_settings(tiny_spec.settings.with_values("train", atss_epochs=3,
                                                                    pretrained="base.pdparams"))
    assert build_config(pinned, RunPaths(Path("x")))["PPYOLOEHead"]["static_assigner_epoch"] == 3

    activate(scratch)
    from ppdet.core.workspace import create

    from detect.assigner import NearCentreTaskAlignedAssigner

    head = create("YOLOv3").yolo_head
    assert isinstance(head.assigner, NearCentreTaskAlignedAssigner)
    assert head.assigner.center_radius == tiny_spec.settings.train.assign_center_radius == 1.0
    assert head.assigner.fpn_strides == head.fpn_strides
