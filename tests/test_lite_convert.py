"""Paddle 2.6 export -> rewrite -> paddle_lite_opt in the edge box (x86 and arm) -> run the x86 .nb in the box.

Real paddle, real Paddle Lite 2.13rc0 under Python 3.9 in the debootstrapped edge box (built once, cached).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from compress.lite_convert import opt_in_edgebox, rewrite_for_lite, unsupported_ops
from edge_runtime.backends.paddlelite_backend import nb_header
from edge_runtime.errors import ModelError, UserInputError
from tests.edgebox import (ROOT, box_json, ensure_edgebox, export_tiny_model, paddle_inference_outputs,
                           run_paddle_script)

pytestmark = [pytest.mark.edgebox, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    """The tiny model exported raw, rewritten, and converted for x86 and arm (shared by the tests here)."""
    ensure_edgebox()
    base = tmp_path_factory.mktemp("lite")
    raw = export_tiny_model(base / "raw")
    report = rewrite_for_lite(raw, base / "fixed")
    x86 = opt_in_edgebox(base / "fixed", base / "nb" / "tiny_x86", "x86")
    arm = opt_in_edgebox(base / "fixed", base / "nb" / "tiny_arm", "arm")
    return {"base": base, "raw": raw, "fixed": base / "fixed", "report": report, "x86": x86, "arm": arm}


def _program(path: Path):
    from detect.heavy import paddle_stack

    paddle_stack()
    from paddle.base.proto import framework_pb2

    prog = framework_pb2.ProgramDesc()
    prog.ParseFromString(path.read_bytes())
    return prog


def test_rewrite_adds_swish_beta_and_xshape_outputs(lite):
    rep = lite["report"]
    # One swish; transpose2, two unsqueeze2 and squeeze2 lack XShape (the reshape2 ops already have it).
    assert (rep.swish_beta_added, rep.xshape_added) == (1, 4)
    prog = _program(lite["fixed"] / "model.pdmodel")
    block = prog.blocks[0]
    var_dims = {v.name: list(v.type.lod_tensor.tensor.dims) for v in block.vars}
    seen = 0
    for op in block.ops:
        if op.type == "swish":
            assert [a.f for a in op.attrs if a.name == "beta"] == [1.0]
        if op.type in ("transpose2", "squeeze2", "unsqueeze2", "reshape2"):
            xshape = [o.arguments for o in op.outputs if o.parameter == "XShape"]
            assert len(xshape) == 1 and len(xshape[0]) == 1 and xshape[0][0] in var_dims
            x = [i.arguments[0] for i in op.inputs if i.parameter == "X"][0]
            assert var_dims[xshape[0][0]] == [0, *var_dims[x]]
            seen += 1
    assert seen == 7
    assert (lite["fixed"] / "model.pdiparams").read_bytes() == (lite["raw"] / "model.pdiparams").read_bytes()
    again = rewrite_for_lite(lite["fixed"], lite["base"] / "again")  # idempotent
    assert (again.swish_beta_added, again.xshape_added) == (0, 0)


def test_rewrite_refuses_missing_export_and_same_dir(lite, tmp_path):
    with pytest.raises(UserInputError, match=r"model\.pdmodel does not exist"):
        rewrite_for_lite(tmp_path, tmp_path / "out")
    with pytest.raises(UserInputError, match="is the source directory"):
        rewrite_for_lite(lite["fixed"], lite["fixed"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pdmodel").write_bytes(b"\xff\xfe not a protobuf \x00" * 3)
    (bad / "model.pdiparams").write_bytes(b"")
    with pytest.raises(ModelError, match="not a Paddle ProgramDesc"):
        rewrite_for_lite(bad, tmp_path / "out2")


def test_raw_paddle26_export_is_refused_by_opt_with_the_fix(lite):
    with pytest.raises(ModelError) as err:
        opt_in_edgebox(lite["raw"], lite["base"] / "nb" / "raw_x86", "x86")
    assert "No attributes called beta found for swish" in str(err.value)
    assert "rewrite_for_lite" in str(err.value)


def test_opt_makes_x86_and_arm_nb_with_version(lite):
    for target in ("x86", "arm"):
        m = lite[target]
        assert m.path.is_file() and m.path.suffix == ".nb" and m.target == target
        assert m.version == "2.13rc0"
        opt_version, kernels = nb_header(m.path)
        assert opt_version == "v2.13-rc"
        assert target in kernels and kernels <= {target, "host"}
    with pytest.raises(UserInputError, match="not one of x86, arm"):
        opt_in_edgebox(lite["fixed"], lite["base"] / "nb" / "m", "opencl")


def test_x86_nb_in_edgebox_matches_paddle_inference(lite):
    base = lite["base"]
    rng = np.random.default_rng(0)
    feeds = {"image": rng.random((1, 3, 32, 32), dtype=np.float32),
             "scale_factor": np.array([[0.5, 2.0]], dtype=np.float32)}
    ref = paddle_inference_outputs(lite["fixed"], feeds)
    np.savez(base / "feeds.npz", **feeds)
    # deploy.json beside the .nb records the version, as the exporter writes it.
    run_dir = base / "run"
    run_dir.mkdir()
    shutil.copy(lite["x86"].path, run_dir / "tiny_x86.nb")
    (run_dir / "deploy.json").write_text(json.dumps({"models": [{"file": "tiny_x86.nb", "runtime_version": "2.13rc0"}]}))
    out = box_json(f"""
        import json, sys, numpy as np
        from edge_runtime.backends import create_backend
        b = create_backend("paddlelite")
        b.load("{run_dir / 'tiny_x86.nb'}", threads=1)
        f = np.load("{base / 'feeds.npz'}")
        outs = b.infer({{"image": f["image"], "scale_factor": f["scale_factor"]}})
        np.savez("{base / 'lite_out.npz'}", *outs)
        print(json.dumps({{"inputs": b.input_names, "outputs": b.output_names, "version": b.version(),
                          "python": sys.version.split()[0]}}))
    """, [base])
    assert out["python"].startswith("3.9.")
    assert out["inputs"] == ["image", "scale_factor"] and len(out["outputs"]) == 2
    assert out["version"] == "2.13rc0"
    got = np.load(base / "lite_out.npz")
    assert len(got.files) == len(ref) == 2
    for i, r in enumerate(ref):
        assert got[f"arr_{i}"].shape == r.shape
        np.testing.assert_allclose(got[f"arr_{i}"], r, rtol=1e-5, atol=1e-5)


def test_runtime_refuses_other_version_and_foreign_cpu_before_loading(lite):
    base = lite["base"]
    other = base / "other"
    other.mkdir()
    shutil.copy(lite["x86"].path, other / "m.nb")
    (other / "deploy.json").write_text(json.dumps({"models": [{"file": "m.nb", "runtime_version": "2.10"}]}))
    arm_dir = base / "armrun"
    arm_dir.mkdir()
    shutil.copy(lite["arm"].path, arm_dir / "m.nb")
    out = box_json(f"""
        import json
        from edge_runtime.backends.paddlelite_backend import PaddleLiteBackend
        from edge_runtime.errors import ModelError
        res = {{}}
        for key, path, expected in (("deploy", "{other / 'm.nb'}", None), ("manifest", "{arm_dir / 'm.nb'}", "2.12"),
                                    ("arm", "{arm_dir / 'm.nb'}", None)):
            try:
                PaddleLiteBackend(expected_version=expected).load(path, 1)
                res[key] = "loaded"
            except ModelError as exc:
                res[key] = str(exc)
        print(json.dumps(res))
    """, [base])
    assert "made by Paddle Lite 2.10" in out["deploy"] and "paddlelite 2.13rc0" in out["deploy"]
    assert "refused" in out["deploy"] and "deploy.json" in out["deploy"]
    assert "made by Paddle Lite 2.12 (the bundle manifest)" in out["manifest"]
    # An ARM .nb in the x86 runtime would segfault: refused with a message instead.
    assert "holds kernels for arm" in out["arm"] and "x86 machine" in out["arm"]


def test_ops_the_target_cannot_run_are_named(tmp_path):
    ensure_edgebox()
    code = """
import sys
sys.path.insert(0, {root!r})
from detect.heavy import paddle_stack
paddle = paddle_stack().paddle
class M(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 4, 1)
    def forward(self, x):
        y = self.conv(x)
        return paddle.cumprod(y, dim=1), paddle.kthvalue(y, 2, axis=-1)[0]
m = M()
m.eval()
paddle.jit.save(m, {out!r}, input_spec=[paddle.static.InputSpec([1, 3, 8, 8], "float32", "x")])
"""
    run_paddle_script(code.format(root=str(ROOT), out=str(tmp_path / "m" / "model")), tmp_path / "export_ops.py")
    with pytest.raises(ModelError) as err:
        opt_in_edgebox(tmp_path / "m", tmp_path / "out" / "m", "x86")
    assert "Paddle Lite x86 cannot run these ops: cumprod, kthvalue" in str(err.value)
    assert not (tmp_path / "out" / "m.nb").exists()


def test_unsupported_ops_parser_reads_both_report_forms():
    text = """OPs in the input model include:
                                        OP_name  kHost  kX86
                                           feed      Y
                                     multiclass_nms3
                                         conv2d             Y
Error: This model is not supported, because 2 ops are not supported on 'x86'. These unsupported ops are: 'cumprod, kthvalue'.
"""
    assert unsupported_ops(text) == ["cumprod", "kthvalue", "multiclass_nms3"]
    assert unsupported_ops("Paddle-Lite supports this model!") == []
