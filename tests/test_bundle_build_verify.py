"""Signed bundles: keys, build, round trip (directory and .tar.gz), immutability, tampering of every file."""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from compress.bundle import ModelFile, build_bundle
from compress.keys import PRIVATE_NAME, PUBLIC_NAME, init_keys, load_private_key
from edge_runtime.bundle import MANIFEST, SIGNATURE, Manifest, safe_extract, sha256_file, verify_bundle
from edge_runtime.errors import BundleError, UserInputError
from edge_runtime.modelspec import InputSpec, PostprocessSpec
from edge_runtime.settings import BoxSettings

# a line's own settings (not the defaults): what the box must get back from the verified manifest
LINE_SETTINGS = BoxSettings.from_sections({"runtime": {"class_thresholds": {"open": 0.35}, "roi": [10, 10, 300, 300]},
                                           "drift": {"window": 120, "min_frames": 60},
                                           "report": {"interval_s": 5.0}}, "test line spec")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A key pair, the inputs of a bundle, and one bundle built from them."""
    base = tmp_path_factory.mktemp("bundle")
    keys = init_keys(base / "keys")
    src = base / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    (src / "model.onnx").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (src / "det_x86.nb").write_bytes(b"\x02\x00v2.13-rc\x00" + bytes(200))
    (src / "model.pdmodel").write_bytes(b"program" * 50)
    (src / "model.pdiparams").write_bytes(b"weights" * 80)
    img = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(src / "board_0001.png"), img)
    (src / "drift.json").write_text(json.dumps({"brightness": {"bins": [0, 1], "counts": [3]}}))
    models = [
        ModelFile(src / "model.onnx", "onnx", "any", "fp32", "in_model", "1.31.1"),
        ModelFile(src / "det_x86.nb", "paddlelite", "x86", "fp32", "host", "2.13rc0"),
        ModelFile(src / "model.pdmodel", "paddle", "any", "fp32", "in_model", "2.6.2", params=src / "model.pdiparams"),
    ]
    args = dict(
        model_files=models, input_spec=InputSpec(size=(320, 320)), postprocess=PostprocessSpec(score_threshold=0.3),
        classes=["short", "open", "spur"], metrics={"map50_95": 0.231, "map50": 0.41},
        recipe={"method": "ptq", "algo": "KL", "calibration_images": 32},
        golden=[(src / "board_0001.png", {"boxes": [[0, 0.9, 1, 2, 3, 4]]})], drift_reference_path=src / "drift.json",
        private_key=load_private_key(keys.private), settings=LINE_SETTINGS,
    )
    out = build_bundle(base / "store", "pcb-1", "1.0.0", None, **args)
    return {"base": base, "keys": keys, "out": out, "args": args}


def test_keys_init_modes_and_refuses_overwrite(store, tmp_path):
    keys = store["keys"]
    assert stat.S_IMODE(keys.private.stat().st_mode) == 0o600
    assert keys.private.name == PRIVATE_NAME and keys.public.name == PUBLIC_NAME
    assert b"PRIVATE KEY" in keys.private.read_bytes() and b"PUBLIC KEY" in keys.public.read_bytes()
    before = keys.private.read_bytes()
    with pytest.raises(UserInputError, match="already exists: refusing to overwrite"):
        init_keys(keys.private.parent)
    assert keys.private.read_bytes() == before
    with pytest.raises(UserInputError, match="cannot read the signing key"):
        load_private_key(tmp_path / "nope.pem")
    with pytest.raises(UserInputError, match="not an unencrypted PEM private key"):
        load_private_key(keys.public)


def test_round_trip_directory_and_archive(store, tmp_path):
    out: Path = store["out"]
    assert out == store["base"] / "store" / "pcb-1" / "1.0.0"
    archive = out.parent / "1.0.0.tar.gz"
    assert archive.is_file()
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == sorted([
        MANIFEST, SIGNATURE, "drift_reference.json", "golden/00-board_0001.png", "golden/00-board_0001.png.expected.json",
        "models/det_x86.nb", "models/model.onnx", "models/model.pdiparams", "models/model.pdmodel",
    ])
    for p in out.rglob("*"):  # immutable on disk
        assert stat.S_IMODE(p.stat().st_mode) & 0o222 == 0, p
    m = verify_bundle(out, store["keys"].public)
    assert (m.line, m.version, m.parent_version, m.classes) == ("pcb-1", "1.0.0", None, ("short", "open", "spur"))
    assert m.input == InputSpec(size=(320, 320)) and m.postprocess.score_threshold == 0.3
    assert m.metrics == {"map50_95": 0.231, "map50": 0.41} and m.recipe["algo"] == "KL"
    assert m.created.endswith("Z")
    assert m.settings == LINE_SETTINGS and m.settings.runtime.class_thresholds == {"open": 0.35}
    assert m.settings.runtime.roi == (10, 10, 300, 300) and m.settings.drift.window == 120
    assert m.settings.report.interval_s == 5.0 and m.settings.drift.psi_alarm == BoxSettings().drift.psi_alarm
    lite = m.model("paddlelite", "x86")
    assert (lite.runtime_version, lite.nms, lite.sha256) == ("2.13rc0", "host", sha256_file(out / lite.file))
    assert m.model("paddle").params.file == "models/model.pdiparams"
    with pytest.raises(BundleError, match=r"has no onnx model for arm .*it has: onnx/any/fp32, paddlelite/x86/fp32"):
        m.model("onnx", "arm")
    assert json.loads(m.path(m.golden[0].expected.file).read_text()) == {"boxes": [[0, 0.9, 1, 2, 3, 4]]}
    assert Manifest.from_dict(json.loads((out / MANIFEST).read_bytes())).to_bytes() == (out / MANIFEST).read_bytes()
    m2 = verify_bundle(archive, store["keys"].public, extract_to=tmp_path / "x")
    assert m2 == m and m2.root == tmp_path / "x"
    # The archive is reproducible: members are relative, owned by root, dated at creation.
    with tarfile.open(archive) as tar:
        assert all(not t.name.startswith(("/", "..")) and t.uid == 0 for t in tar.getmembers())


def test_existing_version_is_never_overwritten(store):
    out: Path = store["out"]
    before = sha256_file(out / MANIFEST)
    with pytest.raises(UserInputError, match="already exists .* bundles are immutable, pick a new version"):
        build_bundle(out.parent.parent, "pcb-1", "1.0.0", None, **store["args"])
    assert sha256_file(out / MANIFEST) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    with pytest.raises(UserInputError, match="version '1.0/../x' must match"):
        build_bundle(out.parent.parent, "pcb-1", "1.0/../x", None, **store["args"])


def _writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return dst


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_one_flipped_byte_in_any_file_is_refused_naming_that_file(store, tmp_path):
    out: Path = store["out"]
    pub = store["keys"].public
    checked = 0
    for rel in _files(out):
        size = (out / rel).stat().st_size
        for pos in sorted({0, size // 2, size - 1}):
            case = _writable_copy(out, tmp_path / f"c{checked}")
            data = bytearray((case / rel).read_bytes())
            data[pos] ^= 0x01
            (case / rel).write_bytes(bytes(data))
            with pytest.raises(BundleError) as err:
                verify_bundle(case, pub)
            expected = {MANIFEST: "manifest.json was modified after signing",
                        SIGNATURE: "manifest.sig is damaged"}.get(rel, f"file {rel} does not match its sha256")
            assert expected in str(err.value) and "refused" in str(err.value), (rel, pos, str(err.value))
            shutil.rmtree(case)
            checked += 1
    assert checked >= 3 * 9 - 2


def test_missing_unlisted_unsigned_and_wrong_key(store, tmp_path):
    out: Path = store["out"]
    pub = store["keys"].public
    case = _writable_copy(out, tmp_path / "extra")
    (case / "models" / "backdoor.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"file models/backdoor.onnx is not listed in manifest.json"):
        verify_bundle(case, pub)
    case = _writable_copy(out, tmp_path / "missing")
    (case / "drift_reference.json").unlink()
    with pytest.raises(BundleError, match="file drift_reference.json listed in manifest.json is missing"):
        verify_bundle(case, pub)
    case = _writable_copy(out, tmp_path / "link")
    (case / "models" / "model.onnx").unlink()
    (case / "models" / "model.onnx").symlink_to(out / "models" / "model.onnx")
    with pytest.raises(BundleError, match="models/model.onnx"):
        verify_bundle(case, pub)
    case = _writable_copy(out, tmp_path / "unsigned")
    (case / SIGNATURE).unlink()
    with pytest.raises(BundleError, match="unsigned bundle refused: .* has no manifest.sig"):
        verify_bundle(case, pub)
    other = init_keys(tmp_path / "otherkeys")
    with pytest.raises(BundleError, match=r"signed by key [0-9a-f]{16}, but this box trusts key [0-9a-f]{16}"):
        verify_bundle(out, other.public)
    with pytest.raises(BundleError, match="is not a PEM public key"):
        verify_bundle(out, other.private)
    with pytest.raises(BundleError, match="does not exist"):
        verify_bundle(tmp_path / "nowhere", pub)


def test_a_forged_manifest_with_recomputed_digests_fails_the_signature(store, tmp_path):
    """An attacker who swaps a model and fixes every checksum still cannot make the signature verify."""
    from edge_runtime.bundle import _sig_check
    import hashlib

    case = _writable_copy(store["out"], tmp_path / "forged")
    (case / "models" / "model.onnx").write_bytes(b"evil model")
    man = json.loads((case / MANIFEST).read_text())
    man["models"][0]["sha256"] = sha256_file(case / "models" / "model.onnx")
    body = (json.dumps(man, indent=2, sort_keys=True) + "\n").encode()
    (case / MANIFEST).write_bytes(body)
    sig = json.loads((case / SIGNATURE).read_text())
    sig["manifest_sha256"] = hashlib.sha256(body).hexdigest()
    sig["check"] = _sig_check(sig)
    (case / SIGNATURE).write_text(json.dumps(sig))
    with pytest.raises(BundleError, match="Ed25519 signature over manifest.json does not verify"):
        verify_bundle(case, store["keys"].public)


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_unsafe_or_damaged_archives_are_refused(store, tmp_path):
    pub = store["keys"].public
    evil = tarfile.TarInfo("../escape.txt")
    evil.size = 3
    with pytest.raises(BundleError, match=r"member '../escape.txt' points outside the bundle"):
        verify_bundle(_tar_with(tmp_path / "a.tar.gz", [(evil, b"abc")]), pub, extract_to=tmp_path / "xa")
    assert not (tmp_path / "escape.txt").exists()
    absolute = tarfile.TarInfo("/etc/passwd-x")
    absolute.size = 1
    with pytest.raises(BundleError, match="points outside the bundle"):
        safe_extract(_tar_with(tmp_path / "b.tar.gz", [(absolute, b"x")]), tmp_path / "xb")
    link = tarfile.TarInfo("manifest.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(BundleError, match="is a link or device"):
        safe_extract(_tar_with(tmp_path / "c.tar.gz", [(link, None)]), tmp_path / "xc")
    data = bytearray((store["out"].parent / "1.0.0.tar.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "d.tar.gz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="d.tar.gz"):
        verify_bundle(tmp_path / "d.tar.gz", pub, extract_to=tmp_path / "xd")


def _resigned(store, tmp_path, name: str, edit) -> Path:
    """A copy of the bundle whose manifest went through ``edit`` and was signed again with the line's key."""
    from edge_runtime.bundle import signature_document

    case = _writable_copy(store["out"], tmp_path / name)
    man = json.loads((case / MANIFEST).read_text())
    edit(man)
    body = (json.dumps(man, indent=2, sort_keys=True) + "\n").encode()
    key = load_private_key(store["keys"].private)
    (case / MANIFEST).write_bytes(body)
    (case / SIGNATURE).write_bytes(signature_document(body, key.sign(body), key.public_key()))
    return case


def test_a_signed_manifest_without_valid_settings_is_refused_naming_the_field(store, tmp_path):
    pub = store["keys"].public
    cases = {
        "missing": (lambda m: m.pop("settings"), "missing field 'settings'"),
        "no-drift": (lambda m: m["settings"].pop("drift"), "section 'drift' is missing"),
        "short": (lambda m: m["settings"]["runtime"].pop("min_area"), "'runtime' lacks min_area"),
        "typo": (lambda m: m["settings"]["drift"].update(windw=5), "unknown key 'drift.windw'. Did you mean 'window'"),
        "type": (lambda m: m["settings"]["runtime"].update(score_threshold="high"), "'runtime.score_threshold' must be"),
        "range": (lambda m: m["settings"]["runtime"]["class_thresholds"].update(open=1.5), "class_thresholds.open"),
    }
    for name, (edit, match) in cases.items():
        with pytest.raises(BundleError, match=match):
            verify_bundle(_resigned(store, tmp_path, name, edit), pub)


def test_settings_must_be_typed_and_match_the_drift_reference(store, tmp_path):
    args = dict(store["args"])
    with pytest.raises(UserInputError, match="bundle settings must be a BoxSettings"):
        build_bundle(tmp_path / "s", "pcb-1", "1.0.0", None, **{**args, "settings": LINE_SETTINGS.to_dict()})
    ref = tmp_path / "drift_other.json"  # a reference decided with the default thresholds, not the line's
    ref.write_text(json.dumps({"meta": {"runtime": BoxSettings().runtime.to_dict()}}))
    with pytest.raises(UserInputError, match="drift reference .* was built with runtime settings .* rebuild"):
        build_bundle(tmp_path / "s", "pcb-1", "1.0.0", None, **{**args, "drift_reference_path": ref})
    assert not (tmp_path / "s" / "pcb-1" / "1.0.0").exists()
    ref.write_text(json.dumps({"meta": {"runtime": LINE_SETTINGS.runtime.to_dict()}}))
    out = build_bundle(tmp_path / "s", "pcb-1", "1.0.0", None, **{**args, "drift_reference_path": ref})
    assert verify_bundle(out, store["keys"].public).settings == LINE_SETTINGS


def test_the_golden_tolerance_travels_in_the_manifest_and_drives_the_box_self_test(store, tmp_path):
    """The gate judges the golden images with the line's compress.golden_* tolerance; the box's self-test must
    compare with the same numbers, so the manifest carries them (malformed ones are refused by field)."""
    from edge_runtime.selftest import Tolerance, compare
    from edge_runtime.postprocess import Detections

    tol = {"score": 0.2, "box_px": 6.0, "box_rel": 0.1, "min_score": 0.25}
    out = build_bundle(tmp_path / "store", "pcb-1", "1.1.0", "1.0.0", **{**store["args"], "golden_tolerance": tol})
    manifest = verify_bundle(out, store["keys"].public)
    assert manifest.golden_tolerance == tol
    assert verify_bundle(store["out"], store["keys"].public).golden_tolerance is None  # older builds: defaults
    # what the self-test does with it: a 0.15 score drift passes the line's tolerance, fails the default one
    exp = Detections(np.array([[10, 10, 50, 50]], np.float32), np.array([0.9], np.float32), np.array([0]))
    got = Detections(np.array([[10, 10, 50, 50]], np.float32), np.array([0.75], np.float32), np.array([0]))
    assert compare(exp, got, Tolerance(**manifest.golden_tolerance)) == []
    assert compare(exp, got, Tolerance()) != []
    raw = json.loads((out / MANIFEST).read_text())
    raw["golden_tolerance"] = {"score": 0.2}
    with pytest.raises(BundleError, match="golden_tolerance"):
        Manifest.from_dict(raw)
