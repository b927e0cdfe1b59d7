"""edge_runtime/targets.py: signed target metadata, every refusal with its reason; injected time, no clock."""
from __future__ import annotations

import ast
import copy
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edge_runtime.errors import BundleError
from edge_runtime.targets import (SCHEMA, TargetError, TargetMetadata, canonical_bytes, sign_target, verify_target)
from tests.test_fleet_helpers import keys

NOW = datetime(2026, 11, 22, 10, 0, 0, tzinfo=timezone.utc)


def meta(**over) -> TargetMetadata:
    base = dict(device="press-01", line="line-a", version="2.0.0", sha256="ab" * 32, length=4096,
                expires="2026-11-23T10:00:00Z", issued="2026-11-22T10:00:00Z", hardware_target="onnx",
                rollback=False, url="/api/v1/bundles/" + "ab" * 32)
    base.update(over)
    return TargetMetadata(**base)


@pytest.fixture(scope="module")
def keypair(tmp_path_factory):
    return keys(tmp_path_factory.mktemp("tkeys"), "targets")


def test_round_trip_and_canonical_bytes(keypair):
    key, _, pub = keypair
    doc = sign_target(meta(), key)
    assert set(doc) == {"signed", "signature", "key_id"} and doc["signed"]["schema"] == SCHEMA
    assert canonical_bytes(doc["signed"]).startswith(b'{"device":"press-01","expires"')
    got = verify_target(doc, pub, device="press-01", line="line-a", now=NOW)
    assert got == meta() and TargetMetadata.from_dict(got.to_dict()) == got
    # the same document verifies with the key given as PEM bytes or object (edge_runtime.bundle.load_public_key)
    assert verify_target(doc, Path(pub).read_bytes(), device="press-01", line="line-a", now=NOW).version == "2.0.0"


@pytest.mark.parametrize("change, message", [
    (lambda d: d["signed"].__setitem__("version", "9.0.0"), "signature does not verify"),
    (lambda d: d["signed"].__setitem__("rollback", True), "signature does not verify"),
    (lambda d: d.__setitem__("signature", "###"), "not valid base64"),
    (lambda d: d.pop("signature"), "expected a JSON object with signed, signature and key_id"),
    (lambda d: d.__setitem__("key_id", "0123456789abcdef"), "signed by key '0123456789abcdef'"),
])
def test_tampered_or_unsigned_is_refused(keypair, change, message):
    key, _, pub = keypair
    doc = copy.deepcopy(sign_target(meta(), key))
    change(doc)
    with pytest.raises(TargetError, match=message):
        verify_target(doc, pub, device="press-01", line="line-a", now=NOW)


def test_other_key_refused(keypair, tmp_path):
    key, _, _ = keypair
    _, _, other_pub = keys(tmp_path, "other")
    with pytest.raises(TargetError, match="this box trusts key"):
        verify_target(sign_target(meta(), key), other_pub, device="press-01", line="line-a", now=NOW)


def test_device_line_expiry_and_length(keypair):
    key, _, pub = keypair
    doc = sign_target(meta(), key)
    with pytest.raises(TargetError, match="for device 'press-01', this box is 'press-02'"):
        verify_target(doc, pub, device="press-02", line="line-a", now=NOW)
    with pytest.raises(TargetError, match="for line 'line-a', this box runs line 'line-b'"):
        verify_target(doc, pub, device="press-01", line="line-b", now=NOW)
    later = NOW + timedelta(days=1)
    with pytest.raises(TargetError, match=r"expired at 2026-11-23T10:00:00Z \(now 2026-11-23T10:00:00Z\); the fleet "
                                          r"server may be frozen or replaying old metadata"):
        verify_target(doc, pub, device="press-01", line="line-a", now=later)
    assert verify_target(doc, pub, device="press-01", line="line-a", now=later - timedelta(seconds=1))
    for length in (0, -5, (1 << 30) + 1):
        with pytest.raises(TargetError, match=f"length {length} bytes is outside 1..{1 << 30}"):
            verify_target(sign_target(meta(length=length), key), pub, device="press-01", line="line-a", now=NOW)
    with pytest.raises(TargetError, match="length 4096 bytes is outside 1..1000"):
        verify_target(doc, pub, device="press-01", line="line-a", now=NOW, max_length=1000)
    assert issubclass(TargetError, BundleError) and TargetError.exit_code == 4


def test_fields_are_checked_by_name():
    good = meta().to_dict()
    with pytest.raises(TargetError, match="missing field\\(s\\) length; unknown field\\(s\\) size"):
        TargetMetadata.from_dict({**{k: v for k, v in good.items() if k != "length"}, "size": 3})
    with pytest.raises(TargetError, match="field length must be an integer, got '4096'"):
        TargetMetadata.from_dict({**good, "length": "4096"})
    with pytest.raises(TargetError, match="field rollback must be true or false, got 0"):
        TargetMetadata.from_dict({**good, "rollback": 0})
    with pytest.raises(TargetError, match="field length must be an integer, got True"):
        TargetMetadata.from_dict({**good, "length": True})
    with pytest.raises(TargetError, match="schema 'defectkit.target/0' is not supported"):
        TargetMetadata.from_dict({**good, "schema": "defectkit.target/0"})
    with pytest.raises(TargetError, match="expires '2026-11-23 10:00' is not an ISO-8601 UTC time"):
        TargetMetadata.from_dict({**good, "expires": "2026-11-23 10:00"})
    with pytest.raises(TargetError, match="sha256 'XY' is not 64 lowercase hex"):
        TargetMetadata.from_dict({**good, "sha256": "XY"})


def test_targets_module_is_a_leaf():
    """stdlib + cryptography + edge_runtime only, and Python 3.9 syntax (future annotations)."""
    src = (Path(__file__).resolve().parents[1] / "edge_runtime" / "targets.py").read_text()
    tree = ast.parse(src, feature_version=(3, 9))
    mods = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    mods |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert mods <= {"__future__", "base64", "binascii", "json", "re", "dataclasses", "datetime", "typing",
                    "edge_runtime", "cryptography"}, mods
    assert "from __future__ import annotations" in src
