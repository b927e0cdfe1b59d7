"""One loader for the runtime's small settings dataclasses (drift, report): a dict from a line spec section, a
bundle manifest or a ``--settings`` file becomes the dataclass, with unknown keys and wrong types refused by
name ("did you mean"). Each dataclass keeps its own ``validate`` for the relations between its fields."""
from __future__ import annotations

import difflib
import math
from dataclasses import fields
from typing import Any, Mapping, Type, TypeVar

from edge_runtime.errors import ConfigError

T = TypeVar("T")


def typed_from_mapping(cls: Type[T], values: Mapping[str, Any] | None, section: str, where: str) -> T:
    """``cls(**values)`` with every key known and every value of its default's type (ints stay ints, a number
    for a float field becomes a finite float); then ``cls.validate(where)`` when it has one."""
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(known))}."
            raise ConfigError(f"{where}: unknown key '{section}.{key}'.{hint}")
        default = getattr(cls, key)
        if isinstance(default, str):
            ok = isinstance(value, str)
        elif isinstance(default, int) and not isinstance(default, bool):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        if not ok:
            raise ConfigError(f"{where}: '{section}.{key}' must be {type(default).__name__}, got {value!r}.")
        kwargs[key] = value
    settings = cls(**kwargs)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate(where)
    return settings
