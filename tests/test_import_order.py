"""Importing the kit's modules in any order never hits the paddle/zlib import-order segfault.

The trap (STACK.md): `import paddle` before zlib is loaded, then ppdet / pycocotools.coco / lap /
pyclipper, dies with SIGSEGV in zlib's inflateReset2. The negative control below shows the trap is
real on this stack, so the ordering tests can fail.
"""
from __future__ import annotations

import pkgutil
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_runtime", "detect", "compress", "fleet", "defectkit")
THEN = "import paddle, ppdet, pycocotools.coco, lap, pyclipper"


def kit_modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        for info in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return names


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_negative_control_the_trap_is_real():
    proc = _run("import paddle\nimport pycocotools.coco\n")
    assert proc.returncode == -11 or proc.returncode == 139 or "Segmentation fault" in proc.stderr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kit_modules_in_random_order_then_the_heavy_stack(seed):
    modules = kit_modules()
    assert len(modules) > 30
    random.Random(seed).shuffle(modules)
    code = "\n".join(f"import {m}" for m in modules) + f"\n{THEN}\nfrom detect.heavy import paddle_stack\npaddle_stack()\n"
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_paddle_stack_first_then_everything():
    code = "from detect.heavy import paddle_stack\npaddle_stack()\n" + "\n".join(f"import {m}" for m in kit_modules())
    proc = _run(code + f"\n{THEN}\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
