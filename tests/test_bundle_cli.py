"""``defectkit keys init`` and ``defectkit bundle build|verify`` through the real CLI entry point.

VERB_MODULES is narrowed to this verb module so the test does not depend on the other verbs' modules
(the table itself is checked to list compress.cli).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import defectkit.cli as cli
from edge_runtime.modelspec import InputSpec, ModelEntry, ModelSpec, file_sha256


@pytest.fixture()
def run(monkeypatch, capsys):
    monkeypatch.setattr(cli, "VERB_MODULES", ("compress.cli",))

    def _run(*argv: str) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def test_compress_cli_is_a_registered_verb_module():
    assert "compress.cli" in cli.VERB_MODULES


def _export(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"onnx bytes" * 100)
    (d / "det_x86.nb").write_bytes(b"\x02\x00v2.13-rc\x00" + bytes(64))
    entries = [
        ModelEntry("model.onnx", "onnx", "any", "fp32", "in_model", None, file_sha256(d / "model.onnx")),
        ModelEntry("det_x86.nb", "paddlelite", "x86", "fp32", "host", "2.13rc0", file_sha256(d / "det_x86.nb")),
    ]
    ModelSpec(line="pcb-1", classes=["short", "open"], input=InputSpec(size=(320, 320)), models=entries).save(d)
    return d


def test_keys_build_verify_and_tamper(run, tmp_path):
    code, out, err = run("keys", "init", "--dir", tmp_path / "keys")
    assert code == 0 and "bundle_signing_key.pem" in out and "key id" in out
    code, out, err = run("keys", "init", "--dir", tmp_path / "keys")
    assert code == 2 and err.startswith("defectkit keys: error:") and "refusing to overwrite" in err

    export = _export(tmp_path)
    (tmp_path / "golden.png").write_bytes(b"\x89PNG fake image bytes")
    (tmp_path / "golden.json").write_text(json.dumps({"boxes": []}))
    (tmp_path / "drift.json").write_text("{}")
    (tmp_path / "metrics.json").write_text(json.dumps({"map50_95": 0.23}))
    (tmp_path / "recipe.json").write_text(json.dumps({"method": "none"}))
    build = ["bundle", "build", "--out", tmp_path / "store", "--version", "2.0.0", "--parent-version", "1.0.0",
             "--deploy", export, "--key", tmp_path / "keys" / "bundle_signing_key.pem",
             "--drift-reference", tmp_path / "drift.json", "--golden", f"{tmp_path / 'golden.png'}={tmp_path / 'golden.json'}",
             "--metrics", tmp_path / "metrics.json", "--recipe", tmp_path / "recipe.json"]
    code, out, err = run(*build)
    assert code == 0, err
    bundle = tmp_path / "store" / "pcb-1" / "2.0.0"
    assert f"bundle pcb-1 2.0.0: {bundle}" in out
    # no --run / --settings-json: the table's defaults, and the command says so
    assert "note: no --run or --settings-json: the bundle carries the default runtime, drift and report" in out
    manifest = json.loads((bundle / "manifest.json").read_text())
    from edge_runtime.settings import BoxSettings

    assert manifest["settings"] == BoxSettings().to_dict()
    assert manifest["parent_version"] == "1.0.0" and manifest["classes"] == ["short", "open"]
    assert manifest["metrics"] == {"map50_95": 0.23}
    assert {m["file"]: m.get("runtime_version") for m in manifest["models"]} == {
        "models/model.onnx": None, "models/det_x86.nb": "2.13rc0"}

    code, out, err = run(*build)
    assert code == 2 and "already exists" in err and "immutable" in err

    pub = tmp_path / "keys" / "bundle_signing_key.pub.pem"
    for target in (bundle, bundle.parent / "2.0.0.tar.gz"):
        code, out, err = run("bundle", "verify", target, "--public-key", pub)
        assert code == 0 and out.startswith("OK: bundle pcb-1 2.0.0 (parent 1.0.0): signature and 5 file checksums")

    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    nb = tampered / "models" / "det_x86.nb"
    os.chmod(nb, 0o644)
    data = bytearray(nb.read_bytes())
    data[5] ^= 0x20
    nb.write_bytes(bytes(data))
    code, out, err = run("bundle", "verify", tampered, "--public-key", pub)
    assert code == 4 and out == ""
    assert err.startswith("defectkit bundle: error:") and "models/det_x86.nb does not match its sha256" in err
    assert err.count("\n") == 1  # one line, no traceback


def test_build_input_errors_are_one_line(run, tmp_path):
    export = _export(tmp_path)
    code, out, err = run("bundle", "build", "--out", tmp_path / "s", "--version", "1", "--deploy", export,
                         "--key", tmp_path / "missing.pem", "--drift-reference", tmp_path / "d.json")
    assert code == 2 and "cannot read the signing key" in err and "defectkit keys init" in err
    run("keys", "init", "--dir", tmp_path / "k")
    key = tmp_path / "k" / "bundle_signing_key.pem"
    (export / "model.onnx").write_bytes(b"changed after export")
    code, out, err = run("bundle", "build", "--out", tmp_path / "s", "--version", "1", "--deploy", export,
                         "--key", key, "--drift-reference", tmp_path / "d.json")
    assert code == 4 and "model.onnx" in err and "sha256" in err
    export2 = _export(tmp_path / "again")
    code, out, err = run("bundle", "build", "--out", tmp_path / "s", "--version", "1", "--deploy", export2,
                         "--key", key, "--drift-reference", tmp_path / "d.json", "--golden", "no-equals-sign")
    assert code == 2 and "--golden 'no-equals-sign': expected IMAGE=EXPECTED.json" in err
    code, out, err = run("bundle", "build", "--out", tmp_path / "s", "--version", "1", "--deploy", export2,
                         "--key", key, "--drift-reference", tmp_path / "d.json")
    assert code == 2 and "bundle input" in err and "d.json does not exist" in err
    assert not (tmp_path / "s" / "pcb-1" / "1").exists()
    code, out, err = run("bundle", "verify", tmp_path / "s", "--public-key", tmp_path / "k" / "bundle_signing_key.pub.pem")
    assert code == 4 and "has no manifest.json: not a defectkit bundle" in err


def test_build_takes_the_line_settings_from_a_json_file(run, tmp_path):
    from edge_runtime.bundle import verify_bundle

    export = _export(tmp_path)
    run("keys", "init", "--dir", tmp_path / "k")
    (tmp_path / "drift.json").write_text("{}")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"runtime": {"class_thresholds": {"open": 0.35}}, "drift": {"window": 120}}))
    base = ["bundle", "build", "--out", tmp_path / "s", "--deploy", export, "--key", tmp_path / "k" / "bundle_signing_key.pem",
            "--drift-reference", tmp_path / "drift.json"]
    code, out, err = run(*base, "--version", "1.0.0", "--settings-json", settings)
    assert code == 0, err
    assert "note:" not in out
    man = verify_bundle(tmp_path / "s" / "pcb-1" / "1.0.0", tmp_path / "k" / "bundle_signing_key.pub.pem")
    assert man.settings.runtime.class_thresholds == {"open": 0.35} and man.settings.drift.window == 120
    assert man.settings.runtime.score_threshold == 0.5 and man.settings.report.interval_s == 60.0  # table defaults
    settings.write_text(json.dumps({"drift": {"windw": 120}}))
    code, out, err = run(*base, "--version", "1.0.1", "--settings-json", settings)
    assert code == 2 and "unknown key 'drift.windw'. Did you mean 'window'?" in err and err.count("\n") == 1
    settings.write_text(json.dumps({"runtime": {"class_thresholds": {"open": 2}}}))
    code, out, err = run(*base, "--version", "1.0.1", "--settings-json", settings)
    assert code == 2 and "class_thresholds.open must be a score between 0 and 1" in err
    with pytest.raises(SystemExit):  # argparse: one source of settings or none
        run(*base, "--version", "1.0.1", "--settings-json", settings, "--run", tmp_path)
    assert not (tmp_path / "s" / "pcb-1" / "1.0.1").exists()
