"""Test helpers for the edge box (scripts/edge_box.sh) and a tiny Paddle model that exercises the Lite rewrite.

The box itself is built once and cached (``$DEFECTKIT_CACHE/edgebox-bullseye-py39``, ~1.5 min the first time);
:func:`ensure_edgebox` only refreshes the copy of edge_runtime when the recipe is unchanged. ``arch="arm64"`` is the
aarch64 box (``edgebox-bullseye-py39-arm64``, ONNX Runtime only), built and run under qemu emulation on this x86 host:
its first build is much slower, so it gets a longer timeout.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "edge_box.sh"
_READY: dict[str, Path] = {}
# First-build budgets: the amd64 box builds natively; the arm64 one runs debootstrap's second stage and pip under
# qemu: 25 min 20 s on 2026-11-30 here (2 cores under a CPU load test and other builds: 19.5 min debootstrap,
# 5.6 min pip), once per machine; a cached box refreshes in seconds.
FIRST_BUILD_TIMEOUT = {"amd64": 900.0, "arm64": 3600.0}


def ensure_edgebox(timeout: float | None = None, arch: str = "amd64") -> Path:
    """Build (first time) or refresh the edge box of ``arch`` (amd64 or arm64); return its root directory."""
    if arch not in FIRST_BUILD_TIMEOUT:
        raise ValueError(f"ensure_edgebox(arch={arch!r}): use one of {sorted(FIRST_BUILD_TIMEOUT)}")
    if arch not in _READY:
        base = ["bash", str(SCRIPT), "--arch", arch]
        proc = subprocess.run([*base, "build"], capture_output=True, text=True,
                              timeout=timeout or FIRST_BUILD_TIMEOUT[arch])
        if proc.returncode != 0:
            raise RuntimeError(f"edge box ({arch}) build failed:\n{proc.stderr[-3000:]}")
        root = subprocess.run([*base, "path"], capture_output=True, text=True, check=True)
        _READY[arch] = Path(root.stdout.strip())
    return _READY[arch]


def box_run(cmd: list[str], binds: list[Path], arch: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` inside the ``arch`` edge box (``edge_box.sh --arch ARCH run``), ``binds`` read-write at the same
    paths; never raises on a non-zero exit (the caller asserts with the output)."""
    args = ["bash", str(SCRIPT), "--arch", arch, "run"]
    for b in dict.fromkeys(str(Path(b).resolve()) for b in binds):
        args += ["--bind", b]
    return subprocess.run([*args, "--", *cmd], capture_output=True, text=True, timeout=timeout)


def run_python_in_box(code: str, binds: list[Path], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run Python source inside the box (project on PYTHONPATH, ``binds`` read-write at the same paths)."""
    from compress.lite_convert import edgebox_run

    return edgebox_run(["python", "-c", textwrap.dedent(code)], binds, timeout=timeout, check=False)


def box_json(code: str, binds: list[Path], timeout: float = 300) -> dict:
    """Run code that prints one JSON object as its last stdout line; return it (assert on failure)."""
    proc = run_python_in_box(code, binds, timeout)
    assert proc.returncode == 0, f"box exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# A small detector-shaped network: two feeds (image, scale_factor), conv + swish, and the reshaping ops whose
# missing XShape output Paddle Lite refuses (transpose2, reshape2, unsqueeze2, squeeze2).
_TINY_MODEL = """
import sys
sys.path.insert(0, {root!r})
from detect.heavy import paddle_stack
paddle = paddle_stack().paddle

class Tiny(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, stride=2, padding=1)
        self.act = paddle.nn.Swish()
        self.head = paddle.nn.Conv2D(8, 4, 1)

    def forward(self, image, scale_factor):
        x = self.head(self.act(self.conv(image)))
        x = paddle.transpose(x, [0, 2, 3, 1])
        x = paddle.reshape(x, [0, -1, 4])
        x = paddle.squeeze(paddle.unsqueeze(x, 1), 1)
        s = paddle.tile(scale_factor, [1, 2]).unsqueeze(1)
        return x * s, paddle.nn.functional.sigmoid(x).sum(axis=-1)

paddle.seed(7)
model = Tiny()
model.eval()
spec = [paddle.static.InputSpec([1, 3, 32, 32], "float32", "image"),
        paddle.static.InputSpec([1, 2], "float32", "scale_factor")]
paddle.jit.save(model, {out!r}, input_spec=spec)
"""


def run_paddle_script(code: str, script: Path) -> None:
    """Run paddle code in a subprocess (keeps paddle's static-graph state out of the test process). It goes
    through a file: paddle.jit.save reads the layer's source code."""
    script.write_text(code)
    env = {"ENABLE_FALL_BACK": "False", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def export_tiny_model(out_dir: Path) -> Path:
    """Save the tiny model with paddle.jit.save (ENABLE_FALL_BACK=False) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run_paddle_script(_TINY_MODEL.format(root=str(ROOT), out=str(out_dir / "model")), out_dir.parent / "export_tiny.py")
    return out_dir


def paddle_inference_outputs(model_dir: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Reference outputs from paddle.inference on the host (a subprocess, same reason as above)."""
    np.savez(model_dir / "_feeds.npz", **feeds)
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
from detect.heavy import paddle_stack
paddle = paddle_stack().paddle
from paddle import inference
cfg = inference.Config({str(model_dir / 'model.pdmodel')!r}, {str(model_dir / 'model.pdiparams')!r})
cfg.disable_glog_info()
pred = inference.create_predictor(cfg)
feeds = np.load({str(model_dir / '_feeds.npz')!r})
for name in pred.get_input_names():
    pred.get_input_handle(name).copy_from_cpu(feeds[name])
pred.run()
outs = [pred.get_output_handle(n).copy_to_cpu() for n in pred.get_output_names()]
np.savez({str(model_dir / '_ref.npz')!r}, *outs)
"""
    run_paddle_script(code, model_dir.parent / "paddle_inference_ref.py")
    ref = np.load(model_dir / "_ref.npz")
    return [ref[f"arr_{i}"] for i in range(len(ref.files))]
