"""Paddle Lite export: rewrite a Paddle 2.6 inference program so ``opt`` accepts it, then convert in the edge box.

Paddle Lite (2.10 and 2.13rc0) refuses raw Paddle 2.6 exports: ``swish`` ops lack the ``beta`` attribute and
``transpose2``/``squeeze2``/``unsqueeze2``/``reshape2`` may lack their ``XShape`` output (STACK.md).
:func:`rewrite_for_lite` adds both to ``model.pdmodel`` through paddle's own ``ProgramDesc`` protobuf and copies
the params byte for byte. :func:`opt_in_edgebox` runs ``paddle_lite_opt`` inside the edge-box root filesystem
(``scripts/edge_box.sh``: PyPI has no paddlelite for this host's Python) and returns the ``.nb`` path with the
Paddle Lite version that must match the runtime's.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from edge_runtime.errors import ModelError, UserInputError

EDGE_BOX_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "edge_box.sh"
XSHAPE_OPS = ("transpose2", "squeeze2", "unsqueeze2", "reshape2")
TARGETS = {"x86": "kX86", "arm": "kARM"}
QDQ_OPS = ("quantize_linear", "dequantize_linear")
MODEL_FILE, PARAMS_FILE = "model.pdmodel", "model.pdiparams"
VERSION_CMD = ["python", "-c", "import importlib.metadata as m; print(m.version('paddlelite'))"]


@dataclass(frozen=True)
class RewriteReport:
    """What :func:`rewrite_for_lite` changed (the numbers show up in the export log)."""

    model: Path
    params: Path
    swish_beta_added: int
    xshape_added: int
    ops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LiteModel:
    """A converted ``.nb`` and the Paddle Lite version of the opt that made it (the runtime must match)."""

    path: Path
    target: str
    version: str


def _find_var(program, block, name: str):
    """The VarDesc of ``name`` visible from ``block`` (its own vars, then its parents')."""
    while True:
        for var in block.vars:
            if var.name == name:
                return var
        if block.parent_idx < 0 or block.parent_idx == block.idx:
            return None
        block = program.blocks[block.parent_idx]


def _add_xshape(program, block, op, framework_pb2) -> bool:
    if any(o.parameter == "XShape" and o.arguments for o in op.outputs):
        return False
    x_name = next((i.arguments[0] for i in op.inputs if i.parameter == "X" and i.arguments), None)
    out_name = next((o.arguments[0] for o in op.outputs if o.parameter == "Out" and o.arguments), None)
    if x_name is None or out_name is None:
        raise ModelError(f"{op.type} op without X input or Out output: the program is malformed")
    name = f"{out_name}.xshape"
    existing = {v.name for v in block.vars}
    while name in existing:
        name += "_"
    var = block.vars.add()
    var.name = name
    var.persistable = False
    var.type.type = framework_pb2.VarType.LOD_TENSOR
    x_var = _find_var(program, block, x_name)
    tensor = var.type.lod_tensor.tensor
    if x_var is not None and x_var.type.HasField("lod_tensor"):
        tensor.data_type = x_var.type.lod_tensor.tensor.data_type
        tensor.dims.extend([0, *x_var.type.lod_tensor.tensor.dims])  # XShape = [0, *x.shape], as paddle does
    else:
        tensor.data_type = framework_pb2.VarType.FP32
        tensor.dims.append(0)
    slot = next((o for o in op.outputs if o.parameter == "XShape"), None) or op.outputs.add()
    slot.parameter = "XShape"
    del slot.arguments[:]
    slot.arguments.append(name)
    return True


def rewrite_for_lite(src_model_dir: str | Path, dst_dir: str | Path) -> RewriteReport:
    """Copy an inference model to ``dst_dir`` with the program rewritten for Paddle Lite's opt; params untouched."""
    from detect.heavy import paddle_stack

    paddle_stack()  # safe import order; the protobuf module comes with paddle
    from paddle.base.proto import framework_pb2

    src, dst = Path(src_model_dir), Path(dst_dir)
    model, params = src / MODEL_FILE, src / PARAMS_FILE
    for p in (model, params):
        if not p.is_file():
            raise UserInputError(f"{p} does not exist: pass the directory of a paddle inference export "
                                 f"({MODEL_FILE} + {PARAMS_FILE}, e.g. from 'defectkit export')")
    if src.resolve() == dst.resolve():
        raise UserInputError(f"rewrite_for_lite: destination {dst} is the source directory; pick another one")
    program = framework_pb2.ProgramDesc()
    try:
        program.ParseFromString(model.read_bytes())
    except Exception as exc:  # protobuf's DecodeError has no stable import path across versions
        raise ModelError(f"{model} is not a Paddle ProgramDesc ({exc}); Paddle 3 'model.json' exports cannot be "
                         "converted, export with paddle 2.6") from None
    swish = xshape = 0
    ops: dict[str, int] = {}
    for block in program.blocks:
        for op in block.ops:
            ops[op.type] = ops.get(op.type, 0) + 1
            if op.type == "swish" and not any(a.name == "beta" for a in op.attrs):
                attr = op.attrs.add()
                attr.name, attr.type, attr.f = "beta", framework_pb2.AttrType.FLOAT, 1.0
                swish += 1
            elif op.type in XSHAPE_OPS:
                xshape += _add_xshape(program, block, op, framework_pb2)
    dst.mkdir(parents=True, exist_ok=True)
    from edge_runtime.fileio import atomic_write_bytes

    out_model = atomic_write_bytes(dst / MODEL_FILE, program.SerializeToString())
    out_params = dst / PARAMS_FILE
    shutil.copyfile(params, out_params)
    for extra in ("infer_cfg.yml",):
        if (src / extra).is_file():
            shutil.copyfile(src / extra, dst / extra)
    return RewriteReport(model=out_model, params=out_params, swish_beta_added=swish, xshape_added=xshape, ops=ops)


# ------------------------------------------------------------------------------------------------- edge box


def edgebox_unavailable() -> str | None:
    """Why Paddle Lite steps cannot run here (one line), or None when the edge box is built and usable.

    The Lite converter and runtime exist only inside the edge box (no Python 3.11 wheel): without it the
    Lite step is skipped and said so, and everything else a command made is kept."""
    import os

    if not EDGE_BOX_SCRIPT.is_file():
        return f"{EDGE_BOX_SCRIPT} is missing (Paddle Lite steps need the kit's checkout)"
    if os.geteuid() != 0:
        return "the edge box needs root (chroot, mount); run as root or build the .nb on a machine that can"
    proc = subprocess.run(["bash", str(EDGE_BOX_SCRIPT), "path"], capture_output=True, text=True)
    root = Path(proc.stdout.strip())
    if proc.returncode != 0 or not (root / ".defectkit-edgebox-recipe").is_file():
        return f"no edge box at {root}: build it once with `bash scripts/edge_box.sh build` (about 2 minutes)"
    return None


def edgebox_run(cmd: Sequence[str], binds: Sequence[str | Path] = (), timeout: float = 600,
                check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` inside the edge box (``scripts/edge_box.sh run``) with ``binds`` visible at the same paths."""
    if not EDGE_BOX_SCRIPT.is_file():
        raise UserInputError(f"{EDGE_BOX_SCRIPT} is missing: Paddle Lite steps need the kit's checkout (scripts/)")
    args = ["bash", str(EDGE_BOX_SCRIPT), "run"]
    for b in dict.fromkeys(str(Path(b).resolve()) for b in binds):
        args += ["--bind", b]
    args += ["--", *cmd]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ModelError(f"edge box command timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        if "no edge box at" in proc.stderr:
            raise UserInputError(proc.stderr.strip().splitlines()[-1] + " (it takes about 2 minutes, once)")
        raise ModelError(f"edge box command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def edgebox_lite_version() -> str:
    """The paddlelite version installed in the edge box (what opt writes and what the runtime checks)."""
    return edgebox_run(VERSION_CMD, timeout=120).stdout.strip().splitlines()[-1]


def unsupported_ops(text: str) -> list[str]:
    """Ops ``paddle_lite_opt --print_model_ops`` reports the target cannot run: the "These unsupported ops are:
    '...'" line, plus table rows without a 'Y' in any target column."""
    bad: set[str] = set()
    for m in re.finditer(r"unsupported ops are:\s*'([^']*)'", text):
        bad.update(op.strip() for op in m.group(1).split(",") if op.strip())
    lines = text.splitlines()
    start = next((i + 1 for i, ln in enumerate(lines) if "OP_name" in ln), len(lines))
    for ln in lines[start:]:
        parts = ln.split()
        if not parts or not re.fullmatch(r"[A-Za-z0-9_]+", parts[0]) or any(p != "Y" for p in parts[1:]):
            break
        if len(parts) == 1:
            bad.add(parts[0])
    return sorted(bad)


def _fatal_lines(text: str) -> list[str]:
    return [ln.split("]", 1)[-1].strip() for ln in text.splitlines() if re.match(r"^\[F ", ln)]


def opt_in_edgebox(model_dir: str | Path, out_stem: str | Path, target: str = "x86",
                   model_filename: str = MODEL_FILE, params_filename: str = PARAMS_FILE,
                   timeout: float = 900) -> LiteModel:
    """Convert a (rewritten) inference model to ``<out_stem>.nb`` for ``target`` ("x86" or "arm") in the edge box.

    Ops the target cannot run are named in a ModelError before converting; an opt crash is reported with its
    check message (e.g. the swish/XShape faults when :func:`rewrite_for_lite` was skipped).
    """
    if target not in TARGETS:
        raise UserInputError(f"Paddle Lite target {target!r} is not one of {', '.join(TARGETS)}")
    model_dir, out_stem = Path(model_dir).resolve(), Path(out_stem).resolve()
    model, params = model_dir / model_filename, model_dir / params_filename
    for p in (model, params):
        if not p.is_file():
            raise UserInputError(f"{p} does not exist: pass the directory of a paddle inference export")
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    binds = [model_dir, out_stem.parent]
    common = [f"--model_file={model}", f"--param_file={params}", f"--valid_targets={target}"]
    probe = edgebox_run(["paddle_lite_opt", "--print_model_ops=true", *common], binds, timeout, check=False)
    # QDQ ops of a PaddleSlim INT8 model (onnx_format=True) have no kernel of their own: opt's quantization
    # passes fold them into int8 kernels, so they are not a reason to refuse (an opt failure is still reported).
    missing = [op for op in unsupported_ops(probe.stdout + probe.stderr) if op not in QDQ_OPS]
    if missing:
        raise ModelError(
            f"{model}: Paddle Lite {target} cannot run these ops: {', '.join(missing)}. Export without them "
            "(e.g. without NMS in the graph: NMS then runs on the host) or choose another target/backend."
        )
    nb = out_stem.with_suffix(".nb")
    if nb.exists():
        nb.unlink()
    proc = edgebox_run(["paddle_lite_opt", *common, "--optimize_out_type=naive_buffer",
                        f"--optimize_out={out_stem}"], binds, timeout, check=False)
    if proc.returncode != 0 or not nb.is_file():
        text = proc.stdout + proc.stderr
        why = "; ".join(_fatal_lines(text)) or "\n".join(text.strip().splitlines()[-6:])
        hint = " (run rewrite_for_lite on the export first)" if re.search(r"beta|XShape", why) else ""
        raise ModelError(f"paddle_lite_opt failed for {model} -> {nb} ({target}): {why}{hint}")
    return LiteModel(path=nb, target=target, version=edgebox_lite_version())


__all__ = ["RewriteReport", "LiteModel", "rewrite_for_lite", "opt_in_edgebox", "edgebox_run",
           "edgebox_lite_version", "unsupported_ops"]
