"""Print the kit's pinned requirements for the GPU image: pyproject's dependencies + the given extras,
minus ``paddlepaddle`` (the base image already holds ``paddlepaddle-gpu`` of the same version; pip would
install the CPU wheel over it). Same pins as pyproject.toml by construction: read from it, not copied.

    python3 docker/pins.py pyproject.toml train vdl > requirements-gpu.txt
"""
from __future__ import annotations

import re
import sys

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # the 2.6.2 GPU image ships an older Python
    import tomli as tomllib

PROVIDED_BY_IMAGE = {"paddlepaddle", "paddlepaddle-gpu"}


def pins(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    wanted = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pins.py: pyproject has no extra '{extra}' (have: {', '.join(sorted(optional))})")
        wanted += optional[extra]
    out = []
    for req in wanted:
        name = re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower()
        if name not in PROVIDED_BY_IMAGE and req not in out:
            out.append(req)
    return out


if __name__ == "__main__":
    print("\n".join(pins(sys.argv[1], sys.argv[2:])))
