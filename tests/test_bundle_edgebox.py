"""The edge box (Python 3.9, its own cryptography) verifies a bundle built and signed on the host."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from compress.bundle import ModelFile, build_bundle
from compress.keys import init_keys, load_private_key
from edge_runtime.modelspec import InputSpec, PostprocessSpec
from edge_runtime.settings import BoxSettings
from tests.edgebox import box_json, ensure_edgebox

pytestmark = [pytest.mark.edgebox, pytest.mark.timeout(300)]


def test_edgebox_verifies_host_bundle_and_refuses_a_flipped_byte(tmp_path):
    ensure_edgebox()
    keys = init_keys(tmp_path / "keys")
    (tmp_path / "m.onnx").write_bytes(b"model" * 99)
    (tmp_path / "img.png").write_bytes(b"png" * 10)
    (tmp_path / "drift.json").write_text("{}")
    out = build_bundle(
        tmp_path / "store", "line-a", "3", "2",
        [ModelFile(tmp_path / "m.onnx", "onnx", "any", "int8", "in_model", "1.19.2")],
        InputSpec(size=(64, 96)), PostprocessSpec(), ["scratch"], {"map50": 0.5}, {"method": "ptq"},
        [(tmp_path / "img.png", {"boxes": []})], tmp_path / "drift.json", load_private_key(keys.private),
        settings=BoxSettings().with_overrides("runtime", class_thresholds={"scratch": 0.35}).with_overrides(
            "drift", window=120),
    )
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    target = bad / "golden" / "00-img.png"
    os.chmod(target, 0o644)
    target.write_bytes(b"pnG" + target.read_bytes()[3:])
    res = box_json(f"""
        import json, sys
        from edge_runtime.bundle import verify_bundle
        from edge_runtime.errors import BundleError
        pub = "{keys.public}"
        d = verify_bundle("{out}", pub)
        t = verify_bundle("{out.parent / '3.tar.gz'}", pub, extract_to="{tmp_path / 'x'}")
        try:
            verify_bundle("{bad}", pub)
            refused = ""
        except BundleError as exc:
            refused = str(exc)
        print(json.dumps({{"py": sys.version.split()[0], "dir": [d.line, d.version, d.parent_version, list(d.input.size)],
                          "same": d == t, "refused": refused, "settings": d.settings.to_dict()}}))
    """, [tmp_path])
    assert res["py"].startswith("3.9.")
    assert res["dir"] == ["line-a", "3", "2", [64, 96]] and res["same"] is True
    # the box (Python 3.9, no PyYAML) reads the line's settings from the verified manifest
    assert res["settings"]["runtime"]["class_thresholds"] == {"scratch": 0.35}
    assert res["settings"]["drift"]["window"] == 120 and res["settings"] == json.loads(
        (out / "manifest.json").read_text())["settings"]
    assert "file golden/00-img.png does not match its sha256" in res["refused"]
    assert json.loads((out / "manifest.json").read_text())["schema"] == "defectkit.bundle/2"
