"""The bench's own venv (ultralytics, torch, scikit-image), made on first use and never a kit dependency.

torch 2.14.1 + torchvision 0.29.1: ultralytics' validator imports torchvision, and PyPI's torchvision does not
import beside the CPU build torch 2.13.0 on this machine ("operator torchvision::nms does not exist", tried
2026-11-30); this pair lies on the machine's disk (/etc/xdg/pip) and runs on the CPU (a CUDA build, ~5.5 GB).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VENV = Path.home() / ".cache" / "defectkit" / "bench-yolo-venv"
PINS = ["torch==2.14.1", "torchvision==0.29.1", "ultralytics==8.4.190", "scikit-image==0.26.0"]
CHECK = ("import torch, torchvision, ultralytics, skimage; torchvision.ops.nms; "
         "print(torch.__version__, ultralytics.__version__, skimage.__version__)")


def bench_python(venv: Path = VENV) -> Path:
    """The venv's python, creating or completing the venv when it cannot import the pinned stack."""
    python = venv / "bin" / "python"
    if python.is_file() and subprocess.run([str(python), "-c", CHECK], capture_output=True).returncode == 0:
        return python
    print(f"creating the bench venv {venv} ({', '.join(PINS)}; a few minutes)", file=sys.stderr, flush=True)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)
    subprocess.run([str(python), "-c", CHECK], check=True)
    return python


def versions(python: Path) -> str:
    """torch, ultralytics and scikit-image versions of the venv, for the results."""
    return subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, check=True).stdout.strip()
