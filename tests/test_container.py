"""The training container built for real (scripts/container.sh, docs/container.md).

The official PaddlePaddle GPU image cannot be pulled here, so the kit's Dockerfile.gpu is built with podman FROM a
local stand-in (debootstrapped Debian bookworm + paddlepaddle-gpu 2.6.2 from PyPI), and a CPU smoke training runs
inside it through the CLI, as a user runs it. The first build downloads ~1.2 GB (Debian packages, the 760 MB
paddle wheel, the kit's pinned dependencies) and takes minutes; later ones are cached (recipe-hash tags), and a
code change only rebuilds the kit's code layers.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "container.sh"

# The first build is long (downloads); the smoke training itself takes well under a minute.
pytestmark = [pytest.mark.container, pytest.mark.timeout(3600)]


def _sh(args: list[str], timeout: float, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def image() -> str:
    proc = _sh(["build"], timeout=3300)
    assert proc.returncode == 0, f"container build failed:\n{proc.stderr[-4000:]}"
    return proc.stdout.strip().splitlines()[-1]


def _run(image: str, cmd: list[str], cwd: Path, binds: list[Path], timeout: float = 600) -> subprocess.CompletedProcess:
    args = ["run", "--image", image]
    for b in binds:
        args += ["--bind", str(b)]
    proc = _sh([*args, "--", *cmd], timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{cmd[:3]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_paddle_inside_is_the_gpu_build_of_2_6_2(image, tmp_path):
    code = ("import zlib, json, sys, numpy, paddle, ppdet, paddleslim, paddle2onnx, onnxruntime, defectkit; "
            "print(json.dumps({'paddle': paddle.__version__, 'cuda': paddle.device.is_compiled_with_cuda(), "
            "'cuda_version': paddle.version.cuda(), 'gpus': paddle.device.cuda.device_count(), "
            "'python': sys.version.split()[0], 'numpy': numpy.__version__, 'kit': defectkit.__file__, "
            "'launch': __import__('importlib.util').util.find_spec('paddle.distributed.launch.main') is not None}))")
    info = json.loads(_run(image, ["python3", "-c", code], tmp_path, []).stdout.strip().splitlines()[-1])
    # PyPI's paddlepaddle-gpu 2.6.2 is a CUDA 11.8 build (the official image's paddle is CUDA 12.0): docs/container.md
    assert info["paddle"] == "2.6.2" and info["cuda"] is True and info["cuda_version"] == "11.8"
    assert info["gpus"] == 0  # no GPU here: the GPU build runs on the CPU
    assert info["python"].startswith("3.11.") and info["numpy"] == "1.23.5"
    assert info["kit"].startswith("/opt/defectkit/") and info["launch"]  # multi-GPU launcher (train_line.sh --gpus)


def test_cpu_smoke_training_through_the_cli(image, tmp_path):
    """`defectkit synth` a tiny line, then `defectkit train` it for one epoch on the CPU, inside the image.

    The working folder is mounted read-only (nothing may be written into it: ppdet's COCO eval used to drop
    bbox.json into the CWD), the data and runs folders read-write, and the run is owned by the calling user."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    data.mkdir()
    runs.mkdir()
    # relative paths, as a user types them: the container starts in the same (mounted) folder
    _run(image, ["defectkit", "synth", "--out", "data/smoke", "--line", "smoke", "--count", "12",
                 "--size", "96", "96", "--seed", "3"], tmp_path, [data], timeout=300)
    spec = data / "smoke" / "smoke.yaml"
    assert spec.is_file() and "image_size: 96" in spec.read_text() and "model_size: tiny" in spec.read_text()
    proc = _run(image, ["defectkit", "train", "data/smoke/smoke.yaml", "--runs", "runs", "--name", "s1", "--epochs", "1",
                        "--batch-size", "4", "--device", "cpu", "--set", "warmup_steps=2",
                        "--set", "multiscale=False", "--set", "visualdl=False"], tmp_path, [data, runs], timeout=900)
    run = runs / "smoke" / "s1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["stop_reason"] == "completed all epochs", metrics
    assert metrics["image_size"] == 96 and metrics["model_size"] == "tiny"
    assert "val" in metrics and "metrics: runs/smoke/s1/metrics.json" in proc.stdout + proc.stderr
    for name in ("best.pdparams", "last.pdparams"):
        w = run / "weights" / name
        assert w.stat().st_size > 100_000, w  # a whole tiny PP-YOLOE+, not a stub
        assert w.stat().st_uid == os.getuid()
    assert list((run / "checkpoints").glob("smoke-s1-e0001/model.pdparams"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs"]  # the read-only CWD stayed clean
    # The weights are a real state dict that paddle inside the image loads back.
    check = ("import zlib, paddle; sd = paddle.load(%r); "
             "print(len(sd), sum(int(v.size) for v in sd.values()))") % str(run / "weights" / "best.pdparams")
    n_tensors, n_params = map(int, _run(image, ["python3", "-c", check], tmp_path, []).stdout.split()[-2:])
    assert n_tensors > 100 and n_params > 100_000


def test_second_build_is_cached(image):
    """Same recipe, nothing rebuilt. When the kit's files changed since the fixture's build (others editing the
    tree), only the kit's code layers may be rebuilt: the dependency layer must come from podman's cache."""
    same_tree = _sh(["path"], timeout=60).stdout.strip() == image
    proc = _sh(["build"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("base root filesystem", "paddle base"):
        assert f"container: {step}: " in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.split(f"container: {step}: ", 1)[1].splitlines()[0].endswith("(cached)")
    assert "debootstrap --" not in proc.stderr
    if same_tree:
        assert proc.stdout.strip().splitlines()[-1] == image
        assert "container: kit image: " in proc.stderr and "building " not in proc.stderr
    else:
        deps_step = proc.stderr.split("RUN python3 -m pip install", 1)[1]
        assert deps_step.split("\nSTEP ", 1)[0].count("--> Using cache") == 1, proc.stderr[-3000:]


def test_build_refuses_missing_host_packages_without_install_deps(tmp_path):
    """With debootstrap, podman and runc missing, `build` names each with its reason and installs nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    hidden = {"debootstrap", "podman", "runc"}
    for d in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            link = bin_dir / name
            if name not in hidden and not link.exists() and os.access(os.path.join(d, name), os.X_OK):
                link.symlink_to(os.path.join(d, name))
    marker = tmp_path / "apt-get-called"
    for tool in ("apt-get", "apt"):
        fake = bin_dir / tool
        fake.unlink(missing_ok=True)
        fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
        fake.chmod(0o755)
    env = {**os.environ, "PATH": str(bin_dir), "DEFECTKIT_CACHE": str(tmp_path / "cache")}
    proc = _sh(["build"], timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    for pkg in sorted(hidden):
        assert f"missing host package '{pkg}'" in proc.stderr
    assert "--install-deps" in proc.stderr and not marker.exists()
    # With --install-deps it announces each package and calls apt-get (here the fake one, which installs nothing).
    proc = _sh(["build", "--install-deps"], timeout=60, env=env)
    assert proc.returncode == 2 and "installing Debian package 'podman' on this host" in proc.stderr
    assert marker.exists() and "'debootstrap' is still missing after apt-get install" in proc.stderr
