"""The line settings the edge box runs on: the ``runtime``, ``drift`` and ``report`` sections of
``detect/defaults.yaml`` as frozen dataclasses (a test keeps their defaults equal to the table).

The trainer resolves them once per command (defaults < line spec < command line), records them in the run's
``settings.yaml`` and writes them into the signed bundle manifest (``settings``); the box reads them from the
verified manifest (``Manifest.settings``), and an override file (``--settings-override``) and command-line flags
go on top (:class:`EffectiveSettings`, :class:`SettingsLayer`). The drift reference is built with the same ``runtime`` section the box
decides with, so both agree by construction. Stdlib only (the box has no PyYAML).
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from edge_runtime.errors import ConfigError
from edge_runtime.typedconf import check_value, defaults_of, did_you_mean, section_dict, typed_from_mapping

BOX_SECTIONS = ("runtime", "drift", "report")
CORRECTIONS = ("bonferroni", "fdr", "none")
MIN_VALID = 20  # fewer finite window values (or reference values) than this: a drift feature is not scored


@dataclass(frozen=True)
class RuntimeSettings:
    """OK/NG decision settings (``runtime`` section): which detections make a part NG."""

    score_threshold: float = 0.5
    class_thresholds: Mapping[str, float] = field(default_factory=dict)
    min_area: float = 0.0
    roi: tuple = ()  # (x1, y1, x2, y2) in original pixels; () = the whole image

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str = "runtime settings",
                     base: "RuntimeSettings | None" = None) -> "RuntimeSettings":
        return typed_from_mapping(cls, values, "runtime", where, base)

    def validate(self, where: str = "runtime settings") -> None:
        problems = []
        if not 0.0 <= self.score_threshold <= 1.0:
            problems.append(f"score_threshold must be a score between 0 and 1 (got {self.score_threshold})")
        for name, value in self.class_thresholds.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not 0.0 <= value <= 1.0:
                problems.append(f"class_thresholds.{name} must be a score between 0 and 1 (got {value!r})")
        if self.min_area < 0:
            problems.append(f"min_area must be >= 0 pixels (got {self.min_area})")
        if self.roi:
            finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in self.roi)
            if len(self.roi) != 4 or not finite:
                problems.append(f"roi must be [x1, y1, x2, y2] in pixels or [] (got {list(self.roi)})")
            elif self.roi[2] <= self.roi[0] or self.roi[3] <= self.roi[1]:
                problems.append(f"roi {list(self.roi)} is empty: x2 must exceed x1 and y2 must exceed y1")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems) + ".")

    def with_overrides(self, **overrides: Any) -> "RuntimeSettings":
        """Command-line values win (None = not given)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.from_mapping(given, where="command line", base=self)

    def to_dict(self) -> dict[str, Any]:
        return section_dict(self)

    def thresholds_for(self, classes: Sequence[str]) -> "np.ndarray":
        """Per-class score thresholds in class-id order; unknown class names are refused."""
        import numpy as np

        unknown = sorted(set(self.class_thresholds) - set(classes))
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, list(classes), n=1)
                hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(
                f"runtime settings: class_thresholds names classes the model does not have: {', '.join(hints)}. "
                f"The model's classes are: {', '.join(classes)}."
            )
        return np.array([self.class_thresholds.get(c, self.score_threshold) for c in classes], dtype=np.float32)

    def lowest_threshold(self) -> float:
        """The lowest score that can make a part NG (the floor of a pre-NMS candidate filter)."""
        return float(min([self.score_threshold, *self.class_thresholds.values()]))


@dataclass(frozen=True)
class DriftSettings:
    """Sliding-window drift monitor settings (``drift`` section)."""

    window: int = 200
    psi_warn: float = 0.1
    psi_alarm: float = 0.25
    ks_p_alarm: float = 0.001
    ks_p_warn: float = 0.05
    eval_every: int = 10
    hysteresis: int = 3
    min_frames: int = 100
    correction: str = "bonferroni"
    psi_max_bins: int = 10

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str = "drift settings",
                     base: "DriftSettings | None" = None) -> "DriftSettings":
        return typed_from_mapping(cls, values, "drift", where, base)

    def validate(self, where: str = "drift settings") -> None:
        problems = []
        if self.window < MIN_VALID:
            problems.append(f"window must be at least {MIN_VALID} frames (got {self.window})")
        if not 1 <= self.min_frames <= self.window:
            problems.append(f"min_frames must be between 1 and window={self.window} (got {self.min_frames})")
        if self.eval_every < 1 or self.hysteresis < 1:
            problems.append(f"eval_every and hysteresis must be >= 1 (got {self.eval_every}, {self.hysteresis})")
        if not 0 < self.psi_warn <= self.psi_alarm:
            problems.append(f"need 0 < psi_warn <= psi_alarm (got {self.psi_warn}, {self.psi_alarm})")
        if not 0 < self.ks_p_alarm <= self.ks_p_warn < 1:
            problems.append(f"need 0 < ks_p_alarm <= ks_p_warn < 1 (got {self.ks_p_alarm}, {self.ks_p_warn})")
        if self.correction not in CORRECTIONS:
            problems.append(f"correction must be one of {', '.join(CORRECTIONS)} (got {self.correction!r})")
        if self.psi_max_bins < 2:
            problems.append(f"psi_max_bins must be >= 2 (got {self.psi_max_bins})")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        return section_dict(self)


@dataclass(frozen=True)
class ReportSettings:
    """Reporting to the collector (``report`` section): cadence, spool cap, hard-example band."""

    interval_s: float = 60.0
    spool_max_mb: float = 200.0
    hard_example_low: float = 0.3
    hard_example_high: float = 0.7
    hard_examples_per_hour: int = 20

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str = "report settings",
                     base: "ReportSettings | None" = None) -> "ReportSettings":
        return typed_from_mapping(cls, values, "report", where, base)

    def validate(self, where: str = "report settings") -> None:
        problems = []
        if self.interval_s <= 0:
            problems.append(f"interval_s must be > 0 seconds (got {self.interval_s})")
        if self.spool_max_mb <= 0:
            problems.append(f"spool_max_mb must be > 0 (got {self.spool_max_mb})")
        if not 0.0 <= self.hard_example_low < self.hard_example_high <= 1.0:
            problems.append(f"need 0 <= hard_example_low < hard_example_high <= 1 "
                            f"(got {self.hard_example_low}, {self.hard_example_high})")
        if self.hard_examples_per_hour < 0:
            problems.append(f"hard_examples_per_hour must be >= 0 (got {self.hard_examples_per_hour})")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        return section_dict(self)


BOX_SECTION_TYPES = {"runtime": RuntimeSettings, "drift": DriftSettings, "report": ReportSettings}


@dataclass(frozen=True)
class BoxSettings:
    """The three sections the box runs on: from the bundle manifest < an override file < flags."""

    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)
    report: ReportSettings = field(default_factory=ReportSettings)

    @classmethod
    def from_sections(cls, raw: Any, where: str, base: "BoxSettings | None" = None,
                      require_all: bool = False) -> "BoxSettings":
        """Sections from a mapping ``{"runtime": {...}, "drift": {...}, "report": {...}}`` over ``base``.

        ``require_all``: a bundle manifest must carry every section in full (a missing key is a malformed
        bundle, refused with the field named, not silently filled from this runtime's defaults)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected an object with sections {', '.join(BOX_SECTIONS)}, "
                              f"got {type(raw).__name__}.")
        for key in raw:
            if key not in BOX_SECTIONS:
                close = difflib.get_close_matches(str(key), BOX_SECTIONS, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{where}: unknown section '{key}'.{hint} The box reads {', '.join(BOX_SECTIONS)}.")
        base = base or cls()
        if require_all:
            for name, typ in BOX_SECTION_TYPES.items():
                section = raw.get(name)
                if not isinstance(section, Mapping):
                    raise ConfigError(f"{where}: section '{name}' is missing.")
                missing = sorted(set(section_dict(typ())) - set(section))
                if missing:
                    raise ConfigError(f"{where}: '{name}' lacks {', '.join(missing)}.")
        return cls(
            runtime=RuntimeSettings.from_mapping(raw.get("runtime"), f"{where}", base.runtime),
            drift=DriftSettings.from_mapping(raw.get("drift"), f"{where}", base.drift),
            report=ReportSettings.from_mapping(raw.get("report"), f"{where}", base.report),
        )

    def with_overrides(self, section: str, **values: Any) -> "BoxSettings":
        """One section with command-line values on top (None = not given)."""
        given = {k: v for k, v in values.items() if v is not None}
        if not given:
            return self
        typ = BOX_SECTION_TYPES[section]
        return replace(self, **{section: typ.from_mapping(given, "command line", getattr(self, section))})

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in BOX_SECTIONS}


# ---------------------------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class SettingsLayer:
    """One layer of overrides on top of the bundle's settings: ``where`` names it in messages and in the
    effective settings' sources ("settings override file 'x.json'", "command line")."""

    where: str
    sections: Mapping[str, Mapping[str, Any]]

    @classmethod
    def checked(cls, raw: Any, where: str) -> "SettingsLayer":
        """A layer whose sections, keys and value types are known (refused with the field named, "did you
        mean"); relations between fields are checked once the layer sits on a bundle's settings."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected an object with sections {', '.join(BOX_SECTIONS)}, "
                              f"got {type(raw).__name__}.")
        sections: dict[str, dict[str, Any]] = {}
        for name, values in raw.items():
            if name not in BOX_SECTION_TYPES:
                raise ConfigError(f"{where}: unknown section '{name}'.{did_you_mean(str(name), list(BOX_SECTIONS))}")
            if not isinstance(values, Mapping):
                raise ConfigError(f"{where}: '{name}' must be a mapping of settings, got {type(values).__name__}.")
            known = defaults_of(BOX_SECTION_TYPES[name])
            sections[name] = {}
            for key, value in values.items():
                if key not in known:
                    raise ConfigError(f"{where}: unknown key '{name}.{key}'.{did_you_mean(str(key), list(known))}")
                sections[name][key] = check_value(where, f"{name}.{key}", value, known[key])
        return cls(where, sections)

    @classmethod
    def load(cls, path: str | Path) -> "SettingsLayer":
        """An override file (JSON: any subset of the sections and keys)."""
        path = Path(path)
        where = f"settings override file '{path}'"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{where} cannot be read ({exc.strerror}).") from None
        except ValueError as exc:
            raise ConfigError(f"{where} is not valid JSON: {exc}") from None
        return cls.checked(raw, where)

    @classmethod
    def flags(cls, where: str = "command line", **sections: Mapping[str, Any]) -> "SettingsLayer":
        """A layer from flag values (None = flag not given), e.g. ``flags(runtime={"score_threshold": 0.3})``."""
        given = {name: {k: v for k, v in values.items() if v is not None} for name, values in sections.items()}
        return cls.checked({name: values for name, values in given.items() if values}, where)


@dataclass(frozen=True)
class EffectiveSettings:
    """The settings the box runs on and where each value came from (``"runtime.score_threshold"`` ->
    ``"bundle pcb-1 1.2.0"`` / ``"settings override file '...'"`` / ``"command line"``)."""

    settings: BoxSettings
    sources: Mapping[str, str]

    @classmethod
    def resolve(cls, base: BoxSettings, base_where: str, layers: Sequence[SettingsLayer] = ()) -> "EffectiveSettings":
        """``base`` (the verified bundle manifest's settings) < each layer in order: the override order in one place."""
        settings = base
        sources = {f"{name}.{key}": base_where for name in BOX_SECTIONS for key in defaults_of(BOX_SECTION_TYPES[name])}
        for layer in layers:
            settings = BoxSettings.from_sections(layer.sections, f"{layer.where} (over {base_where})", settings)
            for name, values in layer.sections.items():
                for key in values:
                    sources[f"{name}.{key}"] = layer.where
        return cls(settings, sources)

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.settings.to_dict(), "sources": dict(self.sources)}
