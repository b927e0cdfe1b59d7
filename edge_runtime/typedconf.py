"""One loader for every settings section (trainer and box alike): a mapping from a line spec, a run's
``settings.yaml``, a bundle manifest or an override file becomes the section's frozen dataclass, with unknown
keys refused by name ("did you mean") and every value checked against its default's type. Each dataclass keeps
its own ``validate(where)`` for the relations between its fields.

Lives in ``edge_runtime`` (the leaf) because the box loads its sections from the bundle with it; the trainer
imports it from here, so both sides parse settings the same way."""
from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, Field, fields
from typing import Any, Mapping, Type, TypeVar

from edge_runtime.errors import ConfigError

T = TypeVar("T")


def did_you_mean(key: str, choices: list[str]) -> str:
    """" Did you mean 'x'?" or the list of known keys: the hint of every unknown-key message."""
    close = difflib.get_close_matches(str(key), choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(choices))}."


def field_default(f: Field) -> Any:
    """The default of a dataclass field (from ``default`` or ``default_factory``)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise TypeError(f"settings field '{f.name}' has no default")


def defaults_of(cls: type) -> dict[str, Any]:
    """Field name -> default value of a settings dataclass (what the table test compares)."""
    return {f.name: field_default(f) for f in fields(cls)}  # type: ignore[arg-type]


def check_value(where: str, key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the default's type, or a ConfigError naming the key and the expected type."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}.")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: '{key}' must be a whole number, got {value!r}.")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}.")
    if isinstance(default, str):
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # e.g. freeze: 2
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: '{key}' must be text, got {value!r}.")
    if isinstance(default, tuple):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}.")
    if isinstance(default, Mapping):
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}.")
    return value


def typed_from_mapping(cls: Type[T], values: Mapping[str, Any] | None, section: str, where: str,
                       base: T | None = None) -> T:
    """``cls`` built from ``base`` (or the defaults) overlaid with ``values``: every key known, every value of
    its default's type; then ``validate(where)`` when the class has one."""
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"{where}: '{section}' must be a mapping of settings, got {type(values).__name__}.")
    known = defaults_of(cls)
    current = dict(known) if base is None else {name: getattr(base, name) for name in known}
    for key, value in (values or {}).items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{section}.{key}'.{did_you_mean(str(key), list(known))}")
        current[key] = check_value(where, f"{section}.{key}", value, known[key])
    settings = cls(**current)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate(where)
    return settings


def plain(value: Any) -> Any:
    """A settings value as YAML/JSON data (tuples become lists, mappings dicts)."""
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def section_dict(obj: Any) -> dict[str, Any]:
    """A settings dataclass as plain data, in field order."""
    return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
