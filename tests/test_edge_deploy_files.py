"""deploy/defectkit-edge.service: the unit parses, its ExecStart is a command line the runtime accepts, the stop
and restart settings match the runtime's SIGTERM handling and exit codes, and ``systemd-analyze verify`` finds
nothing wrong.

``systemd-analyze`` (systemd 252) is installed on the project's machines, so the verify test runs for real; it
needs no running systemd (it loads the unit file offline). The interpreter path of the unit (/opt/edge/bin/python,
the box's venv) does not exist here, so the verified copy points ExecStart at this test's Python; nothing else
is changed.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.cli import build_parser
from edge_runtime.errors import MissingDependencyError, UserInputError

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "defectkit-edge.service"
STATE = "/var/lib/defectkit-edge"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: [Section], Key=Value (repeatable), '#'/';' comments, trailing '\\' continues a line."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            assert line.endswith("]"), f"line {n}: bad section header {line!r}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"line {n}: {line!r} is not Key=Value inside a section"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def example_env() -> dict[str, str]:
    """The edge.env example in the unit's header comment (between the heredoc markers)."""
    text = UNIT.read_text()
    block = text.split("<<'EOF'\n", 1)[1].split("#   EOF", 1)[0]
    env = {}
    for line in block.splitlines():
        line = line[1:].strip() if line.startswith("#") else line.strip()  # the unit's comment marker
        if line and not line.startswith("#"):  # the env file's own comments
            key, value = line.split("=", 1)
            env[key] = value
    return env


def run_subparser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["run"]


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values and len(values) == 1, f"[{section}] {key} should be set once, got {values}"
    return values[0]


def exec_tokens(unit) -> list[str]:
    return shlex.split(one(unit, "Service", "ExecStart"))


def test_every_execstart_flag_exists_in_the_runtime_parser_and_required_ones_are_there(unit):
    tokens = exec_tokens(unit)
    assert tokens[1:4] == ["-m", "edge_runtime", "run"], tokens[:4]
    run = run_subparser()
    known = run._option_string_actions
    flags = [t for t in tokens[4:] if t.startswith("--")]
    assert flags, "ExecStart passes no flags"
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"ExecStart flags unknown to `python -m edge_runtime run`: {unknown}"
    assert len(flags) == len(set(flags)), f"a flag is given twice: {flags}"
    required = {a.option_strings[0] for a in run._actions if a.required}
    assert required <= set(flags), f"required flags missing from ExecStart: {sorted(required - set(flags))}"
    for flag in ("--collector", "--token-file", "--state-dir", "--out", "--bundle"):
        assert flag in flags, f"the unit should set {flag}"
    for i, tok in enumerate(tokens[4:], 4):  # every flag that takes a value has one
        if tok in known and known[tok].nargs is None and not isinstance(known[tok].const, bool):
            assert i + 1 < len(tokens) and not tokens[i + 1].startswith("--"), f"{tok} has no value"


def _expand(tokens: list[str], env: dict[str, str]) -> list[str]:
    """systemd's expansion: ${VAR} stays one word, a lone $VAR splits on spaces, %d/%S are directories."""
    out = []
    for tok in tokens:
        m = re.fullmatch(r"\$([A-Z_]+)", tok)
        if m:
            out += env.get(m.group(1), "").split()
            continue
        tok = re.sub(r"\$\{([A-Z_]+)\}", lambda mm: env[mm.group(1)], tok)
        out.append(tok.replace("%d", "/run/credentials/defectkit-edge.service").replace("%S", "/var/lib"))
    return out


def test_the_command_line_with_the_example_env_parses_and_lands_in_the_state_directory(unit):
    env = example_env()
    tokens = exec_tokens(unit)
    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", " ".join(tokens)))
    assert used <= set(env), f"the example edge.env does not set {sorted(used - set(env))}"
    args = run_subparser().parse_args(_expand(tokens, env)[4:])
    assert args.device_id == env["DEFECTKIT_DEVICE_ID"] and args.source == env["DEFECTKIT_SOURCE"]
    assert args.collector.startswith("https://") and args.threads == 2 and args.targets_public_key
    assert str(args.state_dir).startswith(STATE) and str(args.out).startswith(STATE)
    assert str(args.token_file).startswith("/run/credentials/")
    assert one(unit, "Service", "StateDirectory") == "defectkit-edge"
    assert one(unit, "Service", "LoadCredential").startswith("device.token:")
    assert args.public_key.parent == Path("/etc/defectkit-edge")  # ConfigurationDirectory, read-only is enough
    # without DEFECTKIT_ARGS the optional extras vanish instead of passing an empty argument
    bare = _expand(tokens, {**env, "DEFECTKIT_ARGS": ""})
    assert "" not in bare and run_subparser().parse_args(bare[4:]).threads is None  # RunOptions fills in


def test_stop_and_restart_match_the_runtime(unit):
    s = unit["Service"]
    assert one(unit, "Service", "KillSignal") == "SIGTERM"  # run_command's handler: finish the frame, flush
    assert one(unit, "Service", "KillMode") == "mixed"
    stop = one(unit, "Service", "TimeoutStopSec")
    # shutdown is bounded: uplink thread 2 s + last flush 2 s + update worker 10 s (edge_runtime/run.py)
    assert stop.endswith("s") and int(stop[:-1]) >= 20, stop
    assert one(unit, "Service", "Restart") == "on-failure"  # crash-loop revert needs the restarts
    assert int(one(unit, "Service", "RestartSec").rstrip("s")) >= 5
    assert one(unit, "Unit", "StartLimitIntervalSec") == "0"
    prevent = set(one(unit, "Service", "RestartPreventExitStatus").split())
    assert prevent == {str(UserInputError.exit_code), str(MissingDependencyError.exit_code)}
    assert s["User"] != ["root"] and one(unit, "Service", "User") == "defectkit"
    assert one(unit, "Service", "EnvironmentFile") == "/etc/defectkit-edge/edge.env"
    assert one(unit, "Service", "WorkingDirectory") == "/opt/defectkit"
    assert "PYTHONPATH=/opt/defectkit" in one(unit, "Service", "Environment").split()


def test_hardening_and_limits(unit):
    want = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
            "RestrictSUIDSGID": "yes", "CapabilityBoundingSet": ""}
    for key, value in want.items():
        assert one(unit, "Service", key) == value, key
    assert "%S/defectkit-edge" in unit["Service"]["ReadWritePaths"]
    assert "PrivateDevices" not in unit["Service"]  # would hide /dev/video* from the camera
    for key in ("MemoryMax", "TasksMax", "LimitNOFILE"):
        one(unit, "Service", key)
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_parse_unit_refuses_garbage():
    with pytest.raises(AssertionError, match="not Key=Value"):
        parse_unit("[Service]\nExecStart /bin/true\n")
    with pytest.raises(AssertionError, match="bad section header"):
        parse_unit("[Service\nA=1\n")


def test_systemd_analyze_verify_finds_nothing(tmp_path):
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: install systemd (apt-get install systemd) to verify the unit"
    text = UNIT.read_text().replace("ExecStart=/opt/edge/bin/python ", f"ExecStart={sys.executable} ")
    assert text != UNIT.read_text()
    (tmp_path / "defectkit-edge.service").write_text(text)
    proc = subprocess.run([exe, "verify", "--man=no", str(tmp_path / "defectkit-edge.service")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
    # and verify does catch what we would get wrong: an unknown key and a bad value
    (tmp_path / "bad.service").write_text(text.replace("UMask=0027", "UMask=0027\nRestartz=always\nMemoryMax=lots"))
    bad = subprocess.run([exe, "verify", "--man=no", str(tmp_path / "bad.service")], capture_output=True,
                         text=True, timeout=60)
    assert "Unknown key" in bad.stderr and "Invalid memory limit" in bad.stderr, bad.stderr
