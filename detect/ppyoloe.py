"""PP-YOLOE+ configurations built in plain code from a line spec.

The paddledet wheel ships no ``configs/``; instead of keeping YAML copies we build the same structure
(``ppyoloe_plus_crn.yml`` + reader + optimizer) as a dict, so every value is visible and typed here.
:func:`activate` loads it into ppdet's global config, which ppdet's ``Trainer`` and ``create()`` read.
ppdet mutates that global dict while building modules, so each activation starts from a pristine copy
of the registry taken at first use: two trainings in one process cannot leak settings into each other.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detect.linespec import LineSpec
from edge_runtime.modelspec import InputSpec
from edge_runtime.preprocess import ppdet_test_transforms
from detect.settings import TrainSettings

FPN_STRIDES = (32, 16, 8)  # PP-YOLOE's feature levels, coarsest first: anchor points every 8 px at the finest

# depth and width multipliers of CSPResNet + CustomCSPPAN (PP-YOLOE+ s/m/l/x; "tiny" for tests and demos)
MODEL_MULTIPLIERS: dict[str, tuple[float, float]] = {
    "tiny": (0.33, 0.25),
    "s": (0.33, 0.50),
    "m": (0.67, 0.75),
    "l": (1.00, 1.00),
    "x": (1.33, 1.25),
}
# BatchRandomResize sizes around the line's input size (multiples of 32), as PP-YOLOE's reader does.
MULTISCALE_STEPS = (-64, -32, 0, 32, 64)


@dataclass(frozen=True)
class RunPaths:
    """Where one training run writes: ``runs/<line>/<run>/``."""

    root: Path

    @property
    def settings(self) -> Path:
        """The run's one record of what it used (:mod:`detect.run_settings`)."""
        return self.root / "settings.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def best_weights(self) -> Path:
        return self.root / "weights" / "best.pdparams"

    @property
    def last_weights(self) -> Path:
        return self.root / "weights" / "last.pdparams"

    @property
    def curves_png(self) -> Path:
        return self.root / "training_curves.png"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def vdl_dir(self) -> Path:
        return self.root / "vdl"

    @property
    def log(self) -> Path:
        return self.root / "train.log"


def _dataset(spec: LineSpec, ann: Path, allow_empty: bool, with_gt: bool) -> dict[str, Any]:
    # Evaluation reads images only (ground truth comes from the annotation file): gt arrays of
    # different lengths cannot be collated into a batch, and the loader thread dies silently on it.
    fields = ["image", "gt_bbox", "gt_class", "is_crowd"] if with_gt else ["image"]
    return {
        "name": "COCODataSet",
        "dataset_dir": str(spec.paths.root),
        "image_dir": str(spec.paths.images),  # absolute: os.path.join keeps it
        "anno_path": str(ann),
        "data_fields": fields,
        "allow_empty": allow_empty,
        "empty_ratio": 1.0,
    }


def train_transforms(spec: LineSpec, mosaic_epochs: int) -> tuple[list, list]:
    """Sample and batch transforms of the training reader, in the order that works (STACK.md).

    AugmentHSV needs uint8 images, so it comes right after Decode/Mosaic; RandomDistort is not used.
    Mosaic is a silent no-op unless the reader's ``mosaic_epoch`` is set (see :func:`build_config`).
    """
    train = spec.settings.train
    size = spec.image_size
    sample: list[dict] = [{"Decode": {}}]
    if train.mosaic > 0 and mosaic_epochs > 0:
        sample.append({"Mosaic": {"prob": train.mosaic, "input_dim": [size, size],
                                   "degrees": [-5, 5], "scale": [0.7, 1.3], "shear": [-2, 2],
                                   "translate": [-0.1, 0.1],
                                   # YOLOX-style MixUp happens inside Mosaic (ppdet's dataset hands it a 5th sample)
                                   "enable_mixup": train.mixup > 0,
                                   "mixup_prob": train.mixup, "mixup_scale": [0.5, 1.5]}})
    hgain, sgain, vgain = (float(x) for x in train.hsv)
    if hgain or sgain or vgain:
        sample.append({"AugmentHSV": {"fraction": 0.5, "is_bgr": False,
                                       "hgain": int(hgain * 180), "sgain": int(sgain * 100),
                                       "vgain": int(vgain * 100)}})
    if train.flip > 0:
        sample.append({"RandomFlip": {"prob": train.flip}})
    sizes = [size + d for d in MULTISCALE_STEPS if size + d >= 64] if train.multiscale else [size]
    batch = [
        {"BatchRandomResize": {"target_size": sizes, "random_size": True, "random_interp": True,
                               "keep_ratio": False}},
        {"NormalizeImage": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "norm_type": "none"}},
        {"Permute": {}},
        {"PadGT": {}},
    ]
    return sample, batch


def model_input(spec: LineSpec) -> InputSpec:
    """The pre-processing contract of the line's PP-YOLOE model: written into every deploy.json and bundle, and
    turned into ppdet's evaluation reader by :func:`edge_runtime.preprocess.ppdet_test_transforms`, so the
    trainer's evaluation, every export and the box pre-process from this one description."""
    return InputSpec.from_dict({"size": [spec.image_size, spec.image_size], "color": "RGB",
                                "scale": 1.0 / 255.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
                                "resize": "stretch", "layout": "NCHW", "feeds": ["image", "scale_factor"],
                                "interp": "linear"}, f"line '{spec.line}'")


def eval_transforms(spec: LineSpec) -> list[dict]:
    """ppdet's evaluation/test reader transforms: the edge box's pre-processing of :func:`model_input`."""
    return ppdet_test_transforms(model_input(spec))


def build_config(spec: LineSpec, run: RunPaths, steps_per_epoch_hint: int = 0,
                 static_assigner_epoch: int | None = None) -> dict[str, Any]:
    """The full ppdet configuration for one run, as plain data, from ``spec.settings`` (train and export
    sections); recorded in the run's ``settings.yaml`` under ``ppdet``.

    ``static_assigner_epoch`` pins the ATSS-to-TaskAligned switch (a resumed run with more epochs keeps
    the switch where it was).
    """
    from detect.freeze import frozen_prefixes

    train, export = spec.settings.train, spec.settings.export
    depth, width = MODEL_MULTIPLIERS[spec.model_size]
    epochs = train.epochs
    close_mosaic = train.close_mosaic
    mosaic_epochs = max(0, epochs - close_mosaic) if train.mosaic > 0 else 0
    sample, batch = train_transforms(spec, mosaic_epochs)
    size = spec.image_size
    cfg: dict[str, Any] = {
        "architecture": "YOLOv3",
        "filename": "model",  # ppdet needs it; no "." allowed (export dir = splitext(filename))
        "norm_type": "bn",
        "use_ema": train.ema,
        "ema_decay": train.ema_decay,
        "ema_decay_type": "exponential",
        # frozen layers stay out of the EMA, so the evaluated/exported copy equals the loaded weights
        "ema_black_list": ["proj_conv.weight"] + frozen_prefixes(train.freeze),
        "num_classes": spec.num_classes,
        "metric": "COCO",
        "epoch": epochs,
        "snapshot_epoch": train.eval_interval,
        "log_iter": train.log_interval,
        "save_dir": str(run.checkpoints),
        "output_eval": str(run.eval_dir),
        "weights": str(run.best_weights.with_suffix("")),
        "worker_num": train.workers,
        "use_gpu": train.device == "gpu",
        "print_params": False,  # crashes in ppdet 2.6 (0-d tensor indexing)
        "exclude_nms": False,
        "exclude_post_process": False,
        "YOLOv3": {"backbone": "CSPResNet", "neck": "CustomCSPPAN", "yolo_head": "PPYOLOEHead",
                   "post_process": None},
        "CSPResNet": {"layers": [3, 6, 6, 3], "channels": [64, 128, 256, 512, 1024],
                      "return_idx": [1, 2, 3], "use_large_stem": True, "use_alpha": True,
                      "depth_mult": depth, "width_mult": width},
        "CustomCSPPAN": {"out_channels": [768, 384, 192], "stage_num": 1, "block_num": 3,
                         "act": "swish", "spp": True, "depth_mult": depth, "width_mult": width},
        "PPYOLOEHead": {
            "fpn_strides": list(FPN_STRIDES), "grid_cell_scale": 5.0, "grid_cell_offset": 0.5,
            "static_assigner_epoch": (int(static_assigner_epoch) if static_assigner_epoch is not None
                                      else atss_epochs(train)),
            "use_varifocal_loss": True, "loss_weight": {"class": 1.0, "iou": 2.5, "dfl": 0.5},
            # ATSS takes topk anchors per level: the stride-32 level has only (size/32)^2 (4 at 64 px)
            "static_assigner": {"name": "ATSSAssigner", "topk": min(9, (size // 32) ** 2)},
            # ppdet's task-aligned assigner, thin boxes given anchors near their centre (detect/assigner.py)
            "assigner": {"name": "NearCentreTaskAlignedAssigner", "topk": 13, "alpha": 1.0, "beta": 6.0,
                         "center_radius": train.assign_center_radius, "fpn_strides": list(FPN_STRIDES)},
            "nms": {"name": "MultiClassNMS", "nms_top_k": export.nms_top_k,
                    "keep_top_k": export.keep_top_k,
                    "score_threshold": export.score_threshold,
                    "nms_threshold": export.nms_iou},
        },
        "LearningRate": {"base_lr": train.lr, "schedulers": _schedulers(train, steps_per_epoch_hint)},
        "OptimizerBuilder": {
            "optimizer": {"type": "Momentum", "momentum": train.momentum},
            "regularizer": {"type": "L2", "factor": train.weight_decay},
        },
        "TrainDataset": _dataset(spec, spec.paths.train, allow_empty=True, with_gt=True),
        "EvalDataset": _dataset(spec, spec.paths.val, allow_empty=True, with_gt=False),
        "TestDataset": {"name": "ImageFolder", "anno_path": str(spec.paths.train)},
        "TrainReader": {"sample_transforms": sample, "batch_transforms": batch,
                        "batch_size": train.batch_size, "shuffle": True, "drop_last": True,
                        "use_shared_memory": False, "collate_batch": True,
                        # ppdet groups samples for Mosaic while epoch < mosaic_epoch; 0 means *always*, -1 never
                        "mosaic_epoch": mosaic_epochs if mosaic_epochs > 0 else -1},
        "EvalReader": {"sample_transforms": eval_transforms(spec), "batch_size": 4},
        "TestReader": {"inputs_def": {"image_shape": [3, size, size]},
                       "sample_transforms": eval_transforms(spec), "batch_size": 1},
    }
    if train.visualdl and visualdl_available():
        cfg["use_vdl"] = True  # ppdet's VisualDLWriter callback: losses per step, mAP per evaluation
        cfg["vdl_log_dir"] = str(run.vdl_dir)
    if train.clip_grad_norm > 0:
        cfg["OptimizerBuilder"]["clip_grad_by_norm"] = train.clip_grad_norm
    return cfg


def atss_epochs(train: TrainSettings) -> int:
    """Epochs of ATSS assignment before the task-aligned one: ``train.atss_epochs``, or with -1 none from
    pretrained weights (their boxes already mean something) and a quarter of the epochs (at most 30) else."""
    if train.atss_epochs >= 0:
        return train.atss_epochs
    return 0 if train.pretrained else max(1, min(30, train.epochs // 4))


def visualdl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("visualdl") is not None


def _schedulers(train: TrainSettings, steps_per_epoch: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if train.cosine:
        out.append({"name": "CosineDecay", "max_epochs": train.epochs, "min_lr_ratio": train.min_lr_ratio})
    else:
        out.append({"name": "PiecewiseDecay", "gamma": 1.0, "milestones": [train.epochs + 1], "use_warmup": False})
    if train.warmup_steps > 0:
        out.append({"name": "LinearWarmup", "steps": train.warmup_steps, "start_factor": train.warmup_start_factor})
    return out


def inference_config(spec: LineSpec, run: RunPaths) -> dict[str, Any]:
    """The configuration evaluation and export build their ppdet ``Trainer`` from: no Mosaic/MixUp in the
    (unused) training reader, everything else as in ``spec.settings``."""
    plain = spec.with_settings(spec.settings.with_values("train", mosaic=0.0, mixup=0.0))
    return build_config(plain, run)


_PRISTINE: dict[str, Any] | None = None


def _copy_items(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            out[k] = copy.deepcopy(v)
        except TypeError:  # an object that cannot be copied is kept as is (never mutated by ppdet)
            out[k] = v
    return out


def activate(cfg: dict[str, Any]):
    """Load ``cfg`` into ppdet's global config (from a pristine registry) and return it (an AttrDict)."""
    global _PRISTINE
    from detect.heavy import paddle_stack

    paddle_stack()
    from ppdet.core import workspace
    from ppdet.data import source as ppdet_source
    from ppdet.optimizer import optimizer as ppdet_optimizer

    if _PRISTINE is None:  # registered modules are SchemaDicts (dicts holding a module): copy their items
        _PRISTINE = {k: (v, _copy_items(v)) for k, v in workspace.global_config.items()
                     if isinstance(v, workspace.SchemaDict)}
    workspace.global_config.clear()
    for key, (schema, items) in _PRISTINE.items():
        schema.clear()
        schema.update(_copy_items(items))
        workspace.global_config[key] = schema
    live = copy.deepcopy(cfg)
    # Datasets and LR schedulers are objects in ppdet's YAML (`!COCODataSet`, `!CosineDecay`): build them.
    for key in ("TrainDataset", "EvalDataset", "TestDataset"):
        kwargs = dict(live[key])
        cls = getattr(ppdet_source, kwargs.pop("name"))
        live[key] = cls(**kwargs)
    scheds = []
    for sched in live["LearningRate"]["schedulers"]:
        kwargs = dict(sched)
        scheds.append(getattr(ppdet_optimizer, kwargs.pop("name"))(**kwargs))
    live["LearningRate"]["schedulers"] = scheds
    workspace.merge_config(live)
    return workspace.global_config
