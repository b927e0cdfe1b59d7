"""scripts/edge_box.sh: cached build, and `run` with the project read-only, binds, exit codes, no leaked mounts."""
from __future__ import annotations

import subprocess
import time

import pytest

from compress.lite_convert import edgebox_run
from tests.edgebox import SCRIPT, ensure_edgebox

pytestmark = [pytest.mark.edgebox, pytest.mark.timeout(300)]


def _mounts_under(root) -> list[str]:
    with open("/proc/mounts") as fh:
        return [ln for ln in fh if f" {root}/" in ln or f" {root} " in ln]


def test_second_build_only_refreshes_edge_runtime():
    root = ensure_edgebox()
    stamp = root / ".defectkit-edgebox-recipe"
    before = stamp.read_text()
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "build"], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr and "edge_runtime refreshed" in proc.stderr
    assert took < 20 and stamp.read_text() == before
    assert (root / "opt" / "edge" / "kit" / "edge_runtime" / "bundle.py").is_file()
    pth = list((root / "opt" / "edge" / "lib").glob("python3*/site-packages/defectkit-edge-runtime.pth"))
    assert len(pth) == 1 and pth[0].read_text().strip() == "/opt/edge/kit"


def test_run_binds_project_read_only_and_cleans_up(tmp_path):
    root = ensure_edgebox()
    out = edgebox_run(["sh", "-c", "python -V; test -f /opt/defectkit/edge_runtime/bundle.py && echo project;"
                       f" echo hi > {tmp_path}/from_box.txt; touch /opt/defectkit/x 2>/dev/null || echo ro;"
                       " grep -c ' /proc ' /proc/mounts"], [tmp_path])
    lines = out.stdout.split()
    assert out.stdout.startswith("Python 3.9.") and "project" in lines and "ro" in lines
    assert (tmp_path / "from_box.txt").read_text() == "hi\n"
    assert _mounts_under(root) == []  # the mount namespace died with the command
    # Without PYTHONPATH games: the box's own copy of edge_runtime imports on its own (python -I ignores it).
    iso = edgebox_run(["python", "-I", "-c", "import edge_runtime.bundle as b; print(b.__file__)"])
    assert iso.stdout.strip() == "/opt/edge/kit/edge_runtime/bundle.py"


def test_run_passes_exit_codes_and_refuses_bad_binds(tmp_path):
    proc = edgebox_run(["sh", "-c", "exit 7"], check=False)
    assert proc.returncode == 7
    proc = subprocess.run(["bash", str(SCRIPT), "run", "--bind", str(tmp_path / "nope"), "--", "true"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--bind" in proc.stderr and "no such directory" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "run", "--root", str(tmp_path), "--", "true"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"no edge box at {tmp_path}" in proc.stderr
