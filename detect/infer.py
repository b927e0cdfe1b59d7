"""Evaluate trained weights on a COCO split with ppdet's eval loop + pycocotools.

Used by training (best weights, per class), by ``defectkit eval``, and later by the compression gate.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from detect.evaluate import EvalResult, coco_eval_file
from detect.linespec import LineSpec
from detect.ppyoloe import RunPaths, activate, inference_config
from detect.preflight import check_class_contract
from edge_runtime.errors import ConfigError


def build_eval_trainer(spec: LineSpec, weights: Path | None, ann_file: Path, out_dir: Path):
    """A ppdet ``Trainer`` in eval mode on ``ann_file`` with ``weights`` loaded (None: random init)."""
    check_class_contract(spec, ann_file)
    cfg = inference_config(spec, RunPaths(out_dir))
    cfg["EvalDataset"]["anno_path"] = str(ann_file)
    cfg["output_eval"] = str(out_dir)
    live = activate(cfg)
    from ppdet.engine import Trainer

    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(live, mode="eval")
    trainer._nranks = 1  # evaluation runs in one process even after a multi-process training
    if weights is not None:
        if not Path(weights).is_file():
            raise ConfigError(f"weights '{weights}' do not exist. Train first: `defectkit train LINE.yaml`.")
        from ppdet.utils.checkpoint import load_weight

        with contextlib.redirect_stdout(io.StringIO()):
            load_weight(trainer.model, str(weights)[: -len(".pdparams")])
    return trainer


def evaluate_weights(spec: LineSpec, weights: Path, ann_file: Path, out_dir: Path) -> EvalResult:
    """COCO figures of ``weights`` on ``ann_file`` (ppdet writes bbox.json, pycocotools scores it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bbox = out_dir / "bbox.json"
    if bbox.exists():
        bbox.unlink()
    trainer = build_eval_trainer(spec, weights, ann_file, out_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.evaluate()
    return coco_eval_file(ann_file, bbox)
