"""Label assignment that gives a box thinner than the finest stride a positive anchor too.

ppdet's ``TaskAlignedAssigner`` takes an anchor point as a positive only if it lies strictly inside the box
(the head predicts non-negative distances to the four sides). A box narrower than 8 px at the model input,
the finest stride, often contains no anchor point at all: a pin-hole, a hair-line crack, a pit on an 800x200
line-scan frame squeezed to 320 px. Such a box then gets no positive, and every anchor on it is trained as
background. On the lines of ``bench/new_line.py`` that is 44 % of the strip line's pits, 18 % of the stone
line's pin-holes and 13 % of the weave line's slubs (``defectkit data stats LINE.yaml`` counts, per class, the
boxes thinner than the stride at the model input).

ppdet's own remedy, ``TaskAlignedAssigner_CR`` (PP-YOLOE-SOD), is only reachable with the head's
``reg_range``, which changes the regression head's shape: the kit's base weights would no longer load. This
subclass keeps ppdet's algorithm and helpers and changes one step, the CR rule: a box with no anchor point
inside takes, as candidates, the anchors within ``center_radius`` x their level's stride of its centre. Boxes
with an anchor inside are assigned exactly as by ppdet.
"""
from __future__ import annotations

import zlib  # noqa: F401  -- before paddle (import-order segfault, STACK.md); detect.heavy imports this module
from typing import Sequence

import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402
from ppdet.core.workspace import register  # noqa: E402
from ppdet.modeling.assigners.task_aligned_assigner import TaskAlignedAssigner  # noqa: E402
from ppdet.modeling.assigners.utils import (check_points_inside_bboxes, compute_max_iou_anchor,  # noqa: E402
                                            gather_topk_anchors)
from ppdet.modeling.bbox_utils import batch_iou_similarity  # noqa: E402


def candidate_anchors(anchor_points: paddle.Tensor, strides: paddle.Tensor, gt_bboxes: paddle.Tensor,
                      center_radius: float) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(inside, near)``, each [B, n, L] float: anchor points strictly inside each box, and those within
    ``center_radius`` x stride of its centre (per axis). ``strides`` is [L, 1]."""
    inside = check_points_inside_bboxes(anchor_points, gt_bboxes)
    x, y = anchor_points.unsqueeze([0, 1]).chunk(2, axis=-1)  # [1, 1, L, 1]
    xmin, ymin, xmax, ymax = gt_bboxes.unsqueeze(2).chunk(4, axis=-1)  # [B, n, 1, 1]
    reach = (strides * center_radius).unsqueeze([0, 1])  # [1, 1, L, 1]
    near = (((x - (xmin + xmax) * 0.5).abs() < reach) & ((y - (ymin + ymax) * 0.5).abs() < reach))
    return inside, near.squeeze(-1).astype(inside.dtype)


def level_strides(num_anchors_list: Sequence[int], fpn_strides: Sequence[int]) -> paddle.Tensor:
    """[L, 1]: the stride of each anchor point (levels in the head's order)."""
    return paddle.concat([paddle.full([int(n), 1], float(s)) for n, s in zip(num_anchors_list, fpn_strides)])


@register
class NearCentreTaskAlignedAssigner(TaskAlignedAssigner):
    """ppdet's task-aligned assigner; a box with no anchor point inside takes the anchors near its centre."""

    def __init__(self, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, eps: float = 1e-9,
                 center_radius: float = 1.0, fpn_strides: Sequence[int] = (32, 16, 8)):
        super().__init__(topk=topk, alpha=alpha, beta=beta, eps=eps)
        self.center_radius = float(center_radius)
        self.fpn_strides = list(fpn_strides)

    @paddle.no_grad()
    def forward(self, pred_scores, pred_bboxes, anchor_points, num_anchors_list, gt_labels, gt_bboxes,
                pad_gt_mask, bg_index, gt_scores=None):
        """Same inputs and outputs as ppdet's ``TaskAlignedAssigner.forward``."""
        batch_size, num_anchors, num_classes = pred_scores.shape
        num_max_boxes = gt_bboxes.shape[1]
        if num_max_boxes == 0 or self.center_radius <= 0:  # a batch without boxes, or the rule switched off
            return super().forward(pred_scores, pred_bboxes, anchor_points, num_anchors_list, gt_labels,
                                   gt_bboxes, pad_gt_mask, bg_index, gt_scores)
        ious = batch_iou_similarity(gt_bboxes, pred_bboxes)  # [B, n, L]
        batch_ind = paddle.arange(end=batch_size, dtype=gt_labels.dtype).unsqueeze(-1)
        label_ind = paddle.stack([batch_ind.tile([1, num_max_boxes]), gt_labels.squeeze(-1)], axis=-1)
        box_scores = paddle.gather_nd(pred_scores.transpose([0, 2, 1]), label_ind)  # [B, n, L]
        metrics = box_scores.pow(self.alpha) * ious.pow(self.beta)

        strides = level_strides(num_anchors_list, self.fpn_strides)
        inside, near = candidate_anchors(anchor_points, strides, gt_bboxes, self.center_radius)
        no_anchor_inside = inside.sum(-1, keepdim=True) == 0  # [B, n, 1]
        candidates = paddle.where(no_anchor_inside, near, inside)
        # near-centre candidates rank first (metric <= 1): early on their predicted boxes may not overlap yet
        ranked = (metrics + no_anchor_inside.astype(metrics.dtype)) * candidates
        positive = gather_topk_anchors(ranked, self.topk, topk_mask=pad_gt_mask) * candidates * pad_gt_mask

        positives_per_anchor = positive.sum(axis=-2)
        if positives_per_anchor.max() > 1:  # an anchor claimed by several boxes goes to its highest IoU
            several = (positives_per_anchor.unsqueeze(1) > 1).tile([1, num_max_boxes, 1])
            positive = paddle.where(several, compute_max_iou_anchor(ious), positive)
            positives_per_anchor = positive.sum(axis=-2)
        gt_index = positive.argmax(axis=-2) + batch_ind * num_max_boxes

        labels = paddle.gather(gt_labels.flatten(), gt_index.flatten(), axis=0).reshape([batch_size, num_anchors])
        labels = paddle.where(positives_per_anchor > 0, labels, paddle.full_like(labels, bg_index))
        boxes = paddle.gather(gt_bboxes.reshape([-1, 4]), gt_index.flatten(), axis=0)
        boxes = boxes.reshape([batch_size, num_anchors, 4])
        keep = [c for c in range(num_classes + 1) if c != bg_index]
        scores = paddle.index_select(F.one_hot(labels, num_classes + 1), paddle.to_tensor(keep), axis=-1)
        # soft targets as ppdet: each box's metrics scaled so its best positive scores its best IoU
        metrics = metrics * positive
        metrics = metrics / (metrics.max(axis=-1, keepdim=True) + self.eps) * (ious * positive).max(
            axis=-1, keepdim=True)
        scores = scores * metrics.max(-2).unsqueeze(-1)
        return labels, boxes, scores, positive
