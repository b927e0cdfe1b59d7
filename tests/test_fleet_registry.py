"""The registry and devices through the real CLI (``defectkit registry|fleet``) on a real SQLite store."""
from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest

from defectkit.cli import main
from fleet import devices, registry, store

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def world(tmp_path):
    from tests.test_fleet_helpers import keys

    key, _, pub = keys(tmp_path)
    return tmp_path, key, pub, tmp_path / "fleet.db"


def test_push_list_show_idempotent_and_content_addressed(world, capsys):
    from tests.test_fleet_helpers import make_archive

    base, key, pub, db = world
    a1 = make_archive(base, key, version="1.0.0",
                      metrics={"map50": 0.91, "map_drop_pts": 0.4, "gate_passed": 1.0, "old_classes_map_drop_pts": 0.8},
                      recipe={"run": "runs/line-a-r1", "data_sha256": "d" * 64,
                              "retrain": {"status": "passed", "parent_run": "runs/r0"}},
                      models=(("onnx", "any"), ("paddlelite", "x86")))
    code, out, err = run(capsys, "registry", "push", a1, "--db", db, "--public-key", pub)
    assert code == 0, err
    assert "line-a 1.0.0: registered as candidate" in out
    code, out, _ = run(capsys, "registry", "push", a1, "--db", db)  # the trusted key is remembered
    assert code == 0 and "already registered (same archive): nothing changed" in out
    with store.session(path=db) as conn:
        (v,) = registry.list_versions(conn, line="line-a")
    stored = Path(v["path"])
    assert stored == base / "fleet_registry" / "bundles" / "sha256" / f"{v['sha256']}.tar.gz"
    assert stored.read_bytes() == a1.read_bytes() and not (stored.stat().st_mode & stat.S_IWUSR)
    assert v["state"] == "candidate" and v["hardware_targets"] == ["onnx", "x86"]
    assert v["lineage"]["training_run"] == "runs/line-a-r1" and v["lineage"]["data_hash"] == "d" * 64
    assert v["lineage"]["gate"]["map_drop_pts"] == 0.4
    assert v["lineage"]["forgetting"]["old_classes_map_drop_pts"] == 0.8
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]  # no temporary file left
    code, out, _ = run(capsys, "registry", "list", "line-a", "--db", db)
    assert code == 0 and out.splitlines()[1].split()[:3] == ["1.0.0", "candidate", "onnx,x86"]
    code, out, _ = run(capsys, "registry", "show", "line-a", "1.0.0", "--db", db)
    shown = json.loads(out)
    assert shown["sha256"] == v["sha256"] and [e["kind"] for e in shown["events"]] == ["push"]


def test_push_refusals_name_what_and_why(world, capsys, tmp_path):
    from tests.test_fleet_helpers import keys, make_archive

    base, key, pub, db = world
    code, _, err = run(capsys, "registry", "push", make_archive(base, key, sign=False), "--db", db, "--public-key", pub)
    assert code == 4 and "unsigned bundle refused" in err and "has no manifest.sig" in err
    code, _, err = run(capsys, "registry", "push", make_archive(base, key, tamper=True), "--db", db, "--public-key", pub)
    assert code == 4 and "file models/m0.onnx does not match its sha256" in err
    refused = make_archive(base, key, version="1.1.0", metrics={"map50": 0.5, "gate_passed": 0.0, "q.gate_passed": 1.0})
    code, _, err = run(capsys, "registry", "push", refused, "--db", db, "--public-key", pub)
    assert code == 2 and "did not pass its gates: metrics.gate_passed = 0 (the gate refused this variant)" in err
    forgot = make_archive(base, key, version="1.2.0", recipe={"retrain": {"status": "refused"}})
    code, _, err = run(capsys, "registry", "push", forgot, "--db", db, "--public-key", pub)
    assert code == 2 and "recipe.retrain.status = 'refused'" in err
    other_key, _, other_pub = keys(tmp_path, "other")
    code, _, err = run(capsys, "registry", "push", make_archive(base, other_key, version="1.3.0"), "--db", db,
                       "--public-key", pub)
    assert code == 4 and "bundle signed by key" in err
    ok = make_archive(base, key, version="1.0.0")
    assert run(capsys, "registry", "push", ok, "--db", db, "--public-key", pub)[0] == 0
    code, _, err = run(capsys, "registry", "push", ok, "--db", db, "--public-key", other_pub)
    assert code == 2 and "the registry trusts bundle key" in err
    again = make_archive(base, key, version="1.0.0", metrics={"map50": 0.7, "gate_passed": 1.0})
    code, _, err = run(capsys, "registry", "push", again, "--db", db)
    assert code == 2 and "already in the registry with another archive" in err and "versions are immutable" in err
    with store.session(path=db) as conn:
        assert [v["version"] for v in registry.list_versions(conn, line="line-a")] == ["1.0.0"]
    code, _, err = run(capsys, "registry", "push", base / "nope.tar.gz", "--db", db)
    assert code == 2 and "does not exist" in err


def test_promote_rollback_states(world, capsys):
    from tests.test_fleet_helpers import make_archive

    base, key, pub, db = world
    for i, v in enumerate(("1.0.0", "2.0.0", "3.0.0")):
        assert run(capsys, "registry", "push", make_archive(base, key, version=v), "--db", db, "--public-key", pub)[0] == 0
    code, _, err = run(capsys, "registry", "rollback", "line-a", "--db", db)
    assert code == 2 and "no earlier version that passed its gates and was active" in err
    assert run(capsys, "registry", "promote", "line-a", "1.0.0", "--db", db)[0] == 0
    code, out, _ = run(capsys, "registry", "promote", "line-a", "2.0.0", "--db", db)
    assert code == 0 and "line-a 2.0.0 is active (1.0.0 retired)" in out
    code, _, err = run(capsys, "registry", "promote", "line-a", "2.0.0", "--db", db)
    assert code == 2 and "already the active version" in err
    code, _, err = run(capsys, "registry", "rollback", "line-a", "--to", "3.0.0", "--db", db)
    assert code == 2 and "cannot roll back line-a to 3.0.0: it was never active (state candidate)" in err
    code, _, err = run(capsys, "registry", "rollback", "line-a", "--to", "9.9.9", "--db", db)
    assert code == 2 and "line 'line-a' has no version 9.9.9 in the registry (it has: 1.0.0, 2.0.0, 3.0.0)" in err
    code, out, _ = run(capsys, "registry", "rollback", "line-a", "--db", db)
    assert code == 0 and "1.0.0 is active" in out
    with store.session(path=db) as conn:
        states = {v["version"]: v["state"] for v in registry.list_versions(conn, line="line-a")}
        assert states == {"1.0.0": "active", "2.0.0": "retired", "3.0.0": "candidate"}
        assert registry.served_above(conn, line="line-a", version="1.0.0")  # 2.0.0 ran: 1.0.0 is a rollback
        assert not registry.served_above(conn, line="line-a", version="2.0.0")
    assert registry.version_key("1.10.0") > registry.version_key("1.9.0")


def test_enrol_rotate_revoke(world, capsys):
    from tests.test_fleet_helpers import make_archive

    base, key, pub, db = world
    code, _, err = run(capsys, "fleet", "enroll", "--line", "line-a", "--device", "press-01", "--db", db)
    assert code == 2 and "the registry has no version of that line" in err and "registry push" in err
    run(capsys, "registry", "push", make_archive(base, key), "--db", db, "--public-key", pub)
    code, _, err = run(capsys, "fleet", "enroll", "--line", "line-b", "--device", "press-01", "--db", db)
    assert code == 2 and "(lines in the registry: line-a)" in err
    code, _, err = run(capsys, "fleet", "enroll", "--line", "line-a", "--device", "p1", "--tag", "target=gpu", "--db", db)
    assert code == 2 and "tag target=gpu is not a hardware target; use one of onnx, x86, arm" in err
    code, _, err = run(capsys, "fleet", "enroll", "--line", "line-a", "--device", "p1", "--tag", "site", "--db", db)
    assert code == 2 and "must be KEY=VALUE" in err
    code, out, _ = run(capsys, "fleet", "enroll", "--line", "line-a", "--device", "press-01", "--tag", "site=a",
                       "--tag", "target=x86", "--db", db)
    assert code == 0
    token = out.split("token (shown once, only its salted hash is stored): ")[1].strip()
    assert len(token) >= 43
    with store.session(path=db) as conn:
        row = dict(conn.execute("SELECT * FROM enrolments").fetchone())
        assert token not in json.dumps(row) and len(row["token_salt"]) == 32 and len(row["token_hash"]) == 64
        auth = devices.Authenticator()
        dev, why = auth.identify(conn, token)
        assert dev.device_id == "press-01" and dev.tags == {"site": "a", "target": "x86"} and why is None
        assert auth.identify(conn, token + "x") == (None, None)
    code, _, err = run(capsys, "fleet", "enroll", "--line", "line-a", "--device", "press-01", "--db", db)
    assert code == 2 and "already enrolled on line 'line-a'" in err
    code, out, _ = run(capsys, "fleet", "rotate", "--device", "press-01", "--db", db)
    new = out.rsplit(": ", 1)[1].strip()
    with store.session(path=db) as conn:
        assert auth.identify(conn, token) == (None, None) and auth.identify(conn, new)[0].device_id == "press-01"
    assert run(capsys, "fleet", "revoke", "--device", "press-01", "--db", db)[0] == 0
    with store.session(path=db) as conn:
        dev, why = auth.identify(conn, new)
        assert dev is None and "the token of device 'press-01' was revoked at" in why
    code, _, err = run(capsys, "fleet", "rotate", "--device", "ghost", "--db", db)
    assert code == 2 and "unknown device 'ghost': not enrolled" in err
    code, out, _ = run(capsys, "fleet", "list", "--db", db)
    assert out.splitlines()[1].split() == ["press-01", "line-a", "x86", "site=a,target=x86", "revoked"]


def test_no_import_circle_between_cli_and_collector():
    """fleet/cli.py builds parsers and calls fleet.server; only the entry point fleet/collector.py imports it."""
    def imports(rel):
        tree = ast.parse((ROOT / rel).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert "fleet.collector" not in imports("fleet/cli.py") and "fleet.server" in imports("fleet/cli.py")
    assert "fleet.collector" not in imports("fleet/server.py") and "fleet.cli" not in imports("fleet/server.py")
    assert "fleet.cli" in imports("fleet/collector.py")
    for rel in ("fleet/app.py", "fleet/registry.py", "fleet/rollout.py", "fleet/devices.py", "fleet/channel.py"):
        assert not {m for m in imports(rel) if m and m.split(".")[0] in ("compress", "detect")}, rel
