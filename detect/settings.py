"""Every setting of the kit as typed, frozen sections, resolved once per command.

``detect/defaults.yaml`` is the annotated table a user reads (every key once, ``# (type) meaning``); each of
its sections has one frozen dataclass here or, for the sections the edge box needs (``runtime``, ``drift``,
``report``), in :mod:`edge_runtime.settings` (the box has no YAML and imports nothing of the trainer). A test
keeps the dataclass defaults equal to the table, so a default lives in one table and one dataclass that
cannot disagree.

The override order is one line, :meth:`Settings.resolve`: defaults < line spec < command line. A command
resolves once, a run records the result once (``settings.yaml``, :mod:`detect.run_settings`), and every later
stage (export, compress, bundle, retrain) reads it from the run instead of resolving again.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from edge_runtime.errors import ConfigError
from edge_runtime.settings import DriftSettings, ReportSettings, RuntimeSettings
from edge_runtime.typedconf import did_you_mean, section_dict, typed_from_mapping


@dataclass(frozen=True)
class DataSettings:
    """``data``: splitting and checking a data set."""

    val_fraction: float = 0.2
    split_seed: int = 0
    box_tolerance_px: float = 1.0

    def validate(self, where: str) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{where}: data.val_fraction must be in (0, 1), got {self.val_fraction}.")
        if self.box_tolerance_px < 0:
            raise ConfigError(f"{where}: data.box_tolerance_px must be >= 0, got {self.box_tolerance_px}.")


@dataclass(frozen=True)
class TrainSettings:
    """``train``: one fine-tune (ppdet Trainer) and its checkpoints."""

    epochs: int = 60
    batch_size: int = 8
    lr: float = 0.01
    warmup_steps: int = 30
    warmup_start_factor: float = 0.1
    cosine: bool = True
    min_lr_ratio: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0005
    clip_grad_norm: float = 10.0
    ema: bool = True
    ema_decay: float = 0.998
    eval_interval: int = 0
    eval_share: float = 0.1
    patience: int = 10
    min_delta: float = 0.0
    time_budget_min: float = 20.0
    freeze: str = "none"
    unfreeze_at_epoch: int = 0
    unfreeze_lr_factor: float = 0.1
    flip: float = 0.5
    mosaic: float = 0.0
    close_mosaic: int = 1
    mixup: float = 0.0
    hsv: tuple = (0.015, 0.5, 0.3)
    multiscale: bool = True
    assign_center_radius: float = 1.0
    atss_epochs: int = -1
    workers: int = 0
    seed: int = 0
    pretrained: str = ""
    keep_last: int = 3
    keep_best: bool = True
    keep_weekly: bool = True
    visualdl: bool = True
    device: str = "auto"
    mkl_avx2_on_amd: bool = True
    log_interval: int = 10

    def validate(self, where: str) -> None:
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}: train.{key} must be at least 1, got {getattr(self, key)}.")
        if self.eval_interval < 0:
            raise ConfigError(f"{where}: train.eval_interval must be >= 0 (0 = auto, from train.eval_share), "
                              f"got {self.eval_interval}.")
        if not 0.0 < self.eval_share <= 1.0:
            raise ConfigError(f"{where}: train.eval_share is a share of the training time in (0, 1], "
                              f"got {self.eval_share}.")
        for key in ("flip", "mosaic", "mixup"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{where}: train.{key} is a probability in [0, 1], got {getattr(self, key)}.")
        if self.mixup > 0 and self.mosaic == 0:
            raise ConfigError(f"{where}: train.mixup needs train.mosaic > 0 (PP-YOLOE mixes inside Mosaic samples).")
        if self.close_mosaic < 0:
            raise ConfigError(f"{where}: train.close_mosaic must be >= 0 epochs, got {self.close_mosaic}.")
        # close_mosaic >= epochs is allowed: such a run (e.g. --epochs 1) trains without Mosaic
        ok = len(self.hsv) == 3 and all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in self.hsv)
        if not ok or any(g < 0 for g in self.hsv):
            raise ConfigError(f"{where}: train.hsv must be three non-negative gains [hue, saturation, value], "
                              f"got {list(self.hsv)}.")
        if self.assign_center_radius < 0:
            raise ConfigError(f"{where}: train.assign_center_radius must be >= 0 strides (0 = off), "
                              f"got {self.assign_center_radius}.")
        if self.atss_epochs < -1:
            raise ConfigError(f"{where}: train.atss_epochs must be >= 0 epochs, or -1 (auto), got {self.atss_epochs}.")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"{where}: train.device must be auto, cpu or gpu, got '{self.device}'.")


@dataclass(frozen=True)
class RetrainSettings:
    """``retrain``: an incremental retrain from the line's current model, and its forgetting gate."""

    epochs: int = 0
    lr_factor: float = 0.2
    freeze: str = "backbone"
    replay: float = 0.25
    patience: int = 2
    distill: float = 1.0
    distill_dfl: float = 0.5
    distill_temperature: float = 2.0
    ewc: float = 10.0
    ewc_batches: int = 16
    max_class_drop: float = 5.0
    max_map_drop: float = 1.0
    min_new_class_ap50: float = 0.5

    def validate(self, where: str) -> None:
        if self.epochs < 0:
            raise ConfigError(f"{where}: retrain.epochs must be at least 1 (or 0: chosen from the new data's share), "
                              f"got {self.epochs}.")
        if not 0.02 <= self.lr_factor <= 0.5:
            raise ConfigError(f"{where}: retrain.lr_factor must be in [0.02, 0.5] (a retrain starts from a converged "
                              f"model: 0.1-0.2 of the first fine-tune's lr), got {self.lr_factor}.")
        if not 0.0 <= self.replay <= 1.0:
            raise ConfigError(f"{where}: retrain.replay is a share in [0, 1], got {self.replay}.")
        if self.patience < 0:
            raise ConfigError(f"{where}: retrain.patience must be >= 0 (0 = off), got {self.patience}.")
        for key in ("distill", "distill_dfl", "ewc"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}: retrain.{key} is a loss weight >= 0 (0 = off), got {getattr(self, key)}.")
        if self.distill_temperature <= 0:
            raise ConfigError(f"{where}: retrain.distill_temperature must be > 0, got {self.distill_temperature}.")
        if self.ewc_batches < 1:
            raise ConfigError(f"{where}: retrain.ewc_batches must be >= 1, got {self.ewc_batches}.")


@dataclass(frozen=True)
class ExportSettings:
    """``export``: NMS in the graph and on the host, ONNX opset."""

    nms_iou: float = 0.6
    nms_top_k: int = 1000
    keep_top_k: int = 100
    score_threshold: float = 0.01
    opset: int = 13

    def validate(self, where: str) -> None:
        if not 0.0 < self.nms_iou <= 1.0:
            raise ConfigError(f"{where}: export.nms_iou must be in (0, 1], got {self.nms_iou}.")
        if self.nms_top_k < 1 or self.keep_top_k < 1:
            raise ConfigError(f"{where}: export.nms_top_k and keep_top_k must be >= 1.")


@dataclass(frozen=True)
class CompressSettings:
    """``compress``: pruning, quantization, the accuracy gate and the golden images."""

    max_map_drop: float = 1.0
    calib_images: int = 32
    ptq_algo: str = "KL"
    ort_max_fp32_convs: int = 16
    ort_recipes: tuple = ("default", "fast")
    ptq_max_fp32_convs: int = 8
    prune_flops: float = 0.3
    prune_criterion: str = "fpgm"
    prune_epochs: int = 3
    prune_warmup_steps: int = 10
    qat_epochs: int = 2
    qat_lr_factor: float = 0.1
    qat_warmup_steps: int = 10
    golden_images: int = 8
    golden_score_tol: float = 0.05
    golden_box_px: float = 2.0
    golden_box_rel: float = 0.05
    golden_min_score: float = 0.3
    latency_threads: tuple = (1, 2)

    def validate(self, where: str) -> None:
        if self.max_map_drop < 0:
            raise ConfigError(f"{where}: compress.max_map_drop must be >= 0 points, got {self.max_map_drop}.")
        unknown = [r for r in self.ort_recipes if r not in ("default", "fast")]
        if unknown or not self.ort_recipes:
            raise ConfigError(f"{where}: compress.ort_recipes must list one or both of default, fast; got "
                              f"{list(self.ort_recipes)}.")
        if self.prune_criterion not in ("fpgm", "l1"):
            raise ConfigError(f"{where}: compress.prune_criterion must be fpgm or l1, got '{self.prune_criterion}'.")
        if not 0.0 < self.qat_lr_factor <= 1.0:
            raise ConfigError(f"{where}: compress.qat_lr_factor must be in (0, 1], got {self.qat_lr_factor}.")
        if self.prune_warmup_steps < 1 or self.qat_warmup_steps < 1:
            raise ConfigError(f"{where}: compress.prune_warmup_steps and qat_warmup_steps must be >= 1 "
                              "(ppdet's warmup needs a step).")


SECTION_TYPES: dict[str, type] = {
    "data": DataSettings,
    "train": TrainSettings,
    "retrain": RetrainSettings,
    "export": ExportSettings,
    "compress": CompressSettings,
    "runtime": RuntimeSettings,
    "drift": DriftSettings,
    "report": ReportSettings,
}
SECTIONS = tuple(SECTION_TYPES)

Layer = Mapping[str, Mapping[str, Any]]  # section -> key -> value (a line spec's sections, the CLI's overrides)


def check_sections(where: str, layer: Layer) -> None:
    """Refuse a section name the table does not have ("did you mean")."""
    if not isinstance(layer, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)}).")
    for name, values in layer.items():
        if name not in SECTION_TYPES:
            raise ConfigError(f"{where}: unknown section '{name}'.{did_you_mean(str(name), list(SECTIONS))}")
        if values is not None and not isinstance(values, Mapping):
            raise ConfigError(f"{where}: '{name}' must be a mapping of settings.")


@dataclass(frozen=True)
class Settings:
    """All sections of the table, resolved: what one command (and the run it writes) uses."""

    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    compress: CompressSettings = field(default_factory=CompressSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)
    report: ReportSettings = field(default_factory=ReportSettings)

    @classmethod
    def resolve(cls, *layers: tuple[str, Layer]) -> "Settings":
        """The override order in one line: ``Settings.resolve(("line spec X", spec), ("command line", cli))``
        is defaults < spec < cli. Each layer is checked (unknown sections and keys, types, relations)."""
        settings = cls()
        for where, layer in layers:
            settings = settings.overlay(where, layer)
        return settings

    def overlay(self, where: str, layer: Layer) -> "Settings":
        """These settings with ``layer`` on top (only the sections it names change)."""
        check_sections(where, layer)
        changed = {name: typed_from_mapping(SECTION_TYPES[name], values or {}, name, where, getattr(self, name))
                   for name, values in layer.items()}
        return replace(self, **changed)

    def with_values(self, section: str, **values: Any) -> "Settings":
        """One section with ``values`` on top (a stage's own choices, e.g. QAT's learning rate), type-checked."""
        return self.overlay(f"{section} settings", {section: values})

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> "Settings":
        """A recorded ``settings`` mapping (a run's settings.yaml); keys the record lacks take today's defaults."""
        return cls.resolve((where, raw))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: section_dict(getattr(self, name)) for name in SECTIONS}

    def box_sections(self) -> dict[str, dict[str, Any]]:
        """The sections the edge box runs on, as shipped in the bundle manifest."""
        return {name: section_dict(getattr(self, name)) for name in ("runtime", "drift", "report")}

    def differences(self, other: "Settings") -> list[str]:
        """``section.key: mine -> other`` for every value that differs."""
        out = []
        mine, theirs = self.to_dict(), other.to_dict()
        for name in SECTIONS:
            for key, value in mine[name].items():
                if theirs[name].get(key) != value:
                    out.append(f"{name}.{key}: {value!r} -> {theirs[name].get(key)!r}")
        return out


def field_names(section: str) -> list[str]:
    return [f.name for f in fields(SECTION_TYPES[section])]
