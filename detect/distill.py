"""The old model as a teacher inside a retrain's training step (and the EWC penalty beside it).

A retrain run (``retrain.json`` in its folder) gets two extra loss terms, added inside ppdet's own training step
by wrapping the student's ``PPYOLOEHead.get_loss``: ppdet's loop, optimizer, EMA, checkpoints stay as they are.

- **Teacher**: the parent model (its grown weights ``init.pdparams``; its old rows are the parent's, the appended
  rows are never read), frozen, BN on running statistics, outside the student's layer tree (so outside its
  optimizer, EMA and checkpoints). It sees the *same augmented batch* as the student (``gt_meta['image']``).
  When the student's backbone is frozen (the retrain default) it is the parent's backbone bit for bit, so its
  features are reused and the teacher only runs neck and head.
- ``distill`` x binary KL between teacher and student scores of the **old classes** at temperature ``T``
  (scores are per-class sigmoids in PP-YOLOE), summed over anchors, over the teacher's total old-class score.
- ``distill_dfl`` x KL between the teacher's and the student's box distributions (DFL bins, softmax at ``T``),
  weighted per anchor by the teacher's highest old-class score: boxes are held where the teacher sees an old
  defect. Both are x ``T**2`` (Hinton) and exactly 0 where the student equals the teacher.
- ``ewc`` / 2 x sum F (theta - theta_parent)**2 over the trainable tensors (old class rows only), F the parent's
  Fisher information (:mod:`detect.ewc`).

:func:`install_retrain_terms` is the one hook (called at the end of ``detect.session.build_session``); it does
nothing for a run that is not a retrain.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detect.heavy import paddle_stack
from edge_runtime.errors import ConfigError

RECORD = "retrain.json"
EPS = 1e-6


def _logit(p):
    paddle = paddle_stack().paddle
    p = paddle.clip(p, EPS, 1.0 - EPS)
    return paddle.log(p) - paddle.log(1.0 - p)


def score_kd(student_scores, teacher_scores, n_old: int, temperature: float):
    """Binary KL(teacher || student) of the first ``n_old`` class scores ([B, A, C] sigmoids) at ``temperature``,
    summed, over the teacher's total old-class score (at least 1)."""
    F = paddle_stack().paddle.nn.functional
    t = temperature
    zs, zt = _logit(student_scores[:, :, :n_old]) / t, _logit(teacher_scores[:, :, :n_old]) / t
    pt = F.sigmoid(zt)
    kl = pt * (F.log_sigmoid(zt) - F.log_sigmoid(zs)) + (1.0 - pt) * (F.log_sigmoid(-zt) - F.log_sigmoid(-zs))
    norm = teacher_scores[:, :, :n_old].sum().clip(min=1.0)
    return kl.sum() / norm * (t * t)


def dfl_kd(student_distri, teacher_distri, teacher_scores, n_old: int, temperature: float):
    """KL(teacher || student) of the DFL box distributions ([B, A, 4 * bins] logits) at ``temperature``, per anchor
    weighted by the teacher's highest old-class score."""
    F = paddle_stack().paddle.nn.functional
    t = temperature
    b, a, n = student_distri.shape
    s = student_distri.reshape([b, a, 4, n // 4]) / t
    q = teacher_distri.reshape([b, a, 4, n // 4]) / t
    kl = (F.softmax(q, -1) * (F.log_softmax(q, -1) - F.log_softmax(s, -1))).sum(-1).mean(-1)  # [B, A]
    w = teacher_scores[:, :, :n_old].max(-1)
    return (w * kl).sum() / w.sum().clip(min=1.0) * (t * t)


def head_outputs(head, feats):
    """Sigmoid class scores [B, A, C] and DFL logits [B, A, 4 * bins] of a PPYOLOEHead (its ``forward_train``
    without anchors and loss)."""
    paddle = paddle_stack().paddle
    F = paddle.nn.functional
    scores, distri = [], []
    for i, feat in enumerate(feats):
        avg = F.adaptive_avg_pool2d(feat, (1, 1))
        logit = head.pred_cls[i](head.stem_cls[i](feat, avg) + feat)
        reg = head.pred_reg[i](head.stem_reg[i](feat, avg))
        scores.append(F.sigmoid(logit).flatten(2).transpose([0, 2, 1]))
        distri.append(reg.flatten(2).transpose([0, 2, 1]))
    return paddle.concat(scores, axis=1), paddle.concat(distri, axis=1)


def _batch_norms(layer):
    paddle = paddle_stack().paddle
    return [m for m in layer.sublayers(include_self=True) if isinstance(m, paddle.nn.layer.norm._BatchNormBase)]


def backbone_frozen(model) -> bool:
    """The student's backbone computes exactly what the parent's does: no trainable weight, BN on running stats."""
    return (all(p.stop_gradient for p in model.backbone.parameters())
            and all(getattr(bn, "_use_global_stats", False) for bn in _batch_norms(model.backbone)))


@dataclass
class RetrainTerms:
    """What the wrapped ``get_loss`` adds; kept on the trainer as ``trainer.retrain_terms`` (tests read it)."""

    teacher: Any  # a YOLOv3 model, frozen, eval-mode BN, not a sublayer of the student
    n_old: int
    distill: float
    distill_dfl: float
    temperature: float
    ewc: float = 0.0
    fisher: dict | None = None  # name -> tensor (normalised Fisher), old rows only for class-head tensors
    anchor: dict | None = None  # name -> parent tensor
    shared_backbone: bool = False
    _feats: Any = None

    def teacher_outputs(self, image):
        paddle = paddle_stack().paddle
        with paddle.no_grad():
            feats = self._feats if self._feats is not None else self.teacher.backbone({"image": image})
            return head_outputs(self.teacher.yolo_head, self.teacher.neck(feats))

    def terms(self, student, head_outs, gt_meta) -> dict[str, Any]:
        paddle = paddle_stack().paddle
        out: dict[str, Any] = {}
        if self.distill > 0 or self.distill_dfl > 0:
            t_scores, t_distri = self.teacher_outputs(gt_meta["image"])
            s_scores, s_distri = head_outs[0], head_outs[1]
            if self.distill > 0:
                out["loss_distill_cls"] = self.distill * score_kd(s_scores, t_scores, self.n_old, self.temperature)
            if self.distill_dfl > 0:
                out["loss_distill_dfl"] = self.distill_dfl * dfl_kd(s_distri, t_distri, t_scores, self.n_old,
                                                                    self.temperature)
        self._feats = None
        if self.ewc > 0 and self.fisher:
            total = paddle.zeros([], dtype="float32")
            for name, p in student.named_parameters():
                f = self.fisher.get(name)
                if f is None or p.stop_gradient:
                    continue
                cur = p[: f.shape[0]] if list(f.shape) != list(p.shape) else p
                total = total + (f * (cur - self.anchor[name]) ** 2).sum()
            out["loss_ewc"] = 0.5 * self.ewc * total
        return out


def wrap_get_loss(model, terms: RetrainTerms) -> None:
    """Put ``terms`` into the student's loss: ``head.get_loss`` wrapped on the instance, the backbone's output
    kept for the teacher while the backbone is frozen."""
    head, backbone = model.yolo_head, model.backbone
    orig_loss, orig_backbone = head.get_loss, backbone.forward

    def backbone_forward(inputs, *args, **kwargs):
        feats = orig_backbone(inputs, *args, **kwargs)
        if model.training and terms.shared_backbone and backbone_frozen(model):
            terms._feats = [f.detach() for f in feats]
        return feats

    def get_loss(head_outs, gt_meta, aux_pred=None):
        loss = orig_loss(head_outs, gt_meta, aux_pred)
        extra = terms.terms(model, head_outs, gt_meta)
        for key, value in extra.items():
            loss[key] = value
            loss["loss"] = loss["loss"] + value
        return loss

    head.get_loss = get_loss
    backbone.forward = backbone_forward


def build_teacher(model, weights: Path):
    """A copy of the student's architecture with ``weights``: frozen, BN on running statistics, never trained."""
    import copy

    paddle = paddle_stack().paddle
    teacher = copy.deepcopy(model)
    teacher.set_state_dict(paddle.load(str(weights)))
    teacher.eval()
    for p in teacher.parameters():
        p.stop_gradient = True
    return teacher


def install_retrain_terms(session) -> RetrainTerms | None:
    """The hook: if ``session.run`` is a retrain (its ``retrain.json`` names the teacher), add the teacher and EWC
    terms to the student's loss; returns them (also kept as ``session.trainer.retrain_terms``)."""
    path = Path(session.run.root) / RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    teacher_info = record.get("teacher")
    if not teacher_info:  # a retrain recorded before teachers existed
        return None
    r = session.spec.settings.retrain
    ewc = record.get("ewc") or {}
    if r.distill <= 0 and r.distill_dfl <= 0 and r.ewc <= 0:
        return None
    model = session.trainer.model
    weights = Path(teacher_info["weights"])
    if not weights.is_file():
        raise ConfigError(f"retrain {session.run.root}: the teacher's weights {weights} are gone; the run cannot "
                          f"continue as it started (they are the grown parent weights written when it began).")
    n_old = int(teacher_info["old_classes"])
    old = list((record.get("parent") or {}).get("classes") or [])
    if old and (len(old) != n_old or list(session.spec.classes[:n_old]) != old):
        raise ConfigError(f"retrain {session.run.root}: the teacher's classes {old} are not the first classes of "
                          f"the run's {list(session.spec.classes)}; distilling them would pull each old score toward "
                          f"another class. Start the retrain again from the parent run (`defectkit retrain --from "
                          f"{(record.get('parent') or {}).get('run')}`) with its classes first, new ones appended.")
    if not 0 < n_old <= model.yolo_head.num_classes:
        raise ConfigError(f"retrain {session.run.root}: the teacher has {n_old} classes, the student "
                          f"{model.yolo_head.num_classes}; a teacher's classes must be the first of the student's.")
    terms = RetrainTerms(build_teacher(model, weights), n_old, r.distill, r.distill_dfl, r.distill_temperature)
    terms.shared_backbone = backbone_frozen(model)
    if r.ewc > 0:
        from detect.ewc import load_fisher

        if not ewc.get("fisher"):
            raise ConfigError(f"retrain {session.run.root}: retrain.ewc is {r.ewc} but retrain.json names no Fisher "
                              f"file; start the retrain again with `defectkit retrain --set ewc={r.ewc}`.")
        terms.ewc = r.ewc
        terms.fisher, terms.anchor = load_fisher(Path(ewc["fisher"]), Path(teacher_info["parent_weights"]), model)
    wrap_get_loss(model, terms)
    session.trainer.retrain_terms = terms
    return terms
