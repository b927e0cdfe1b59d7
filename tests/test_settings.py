"""Settings: one table, one dataclass per section, resolved once per command, recorded once per run.

No training here: the table, the loader's refusals, the override order, a run's settings.yaml, a run from
before settings.yaml, and the bound on where the command line is put on a spec.
"""
from __future__ import annotations

import ast
import re
from dataclasses import fields, replace
from pathlib import Path

import pytest
import yaml

from defectkit.cli import build_parser, main
from detect.linespec import DEFAULTS_PATH, LineSpec, load_table
from detect.run_settings import (load_run_spec, migrate_legacy_run, read_record, spec_for_run,
                                 write_run_settings)
from detect.settings import SECTION_TYPES, Settings
from edge_runtime.errors import ConfigError
from edge_runtime.typedconf import defaults_of, plain

ROOT = Path(__file__).resolve().parent.parent
KIT_PACKAGES = ("detect", "compress", "edge_runtime", "fleet", "defectkit")
# a dataclass field's annotation -> the type word of its table comment
TABLE_TYPE = {"int": "int", "float": "float", "bool": "bool", "str": "str", "tuple": "list"}


def _table_lines() -> dict[str, dict[str, tuple[str, str]]]:
    """section -> key -> (type word, meaning) from the comments of detect/defaults.yaml; refuses a key line
    without a ``# (type) meaning`` comment."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    section = None
    for number, line in enumerate(DEFAULTS_PATH.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        head = re.match(r"^([a-z_]+):\s*$", line)
        if head:
            section = head[1]
            out[section] = {}
            continue
        m = re.match(r"^  ([a-z_0-9]+):\s*(.*?)\s+# \(([a-z]+)\) (\S.*)$", line)
        assert m and section, f"defaults.yaml:{number} has no '# (type) meaning' comment: {line!r}"
        out[section][m[1]] = (m[3], m[4])
    return out


def test_every_sections_dataclass_defaults_equal_the_table():
    table = load_table()
    assert set(table) == set(SECTION_TYPES), "sections of the table and of Settings differ"
    for name, cls in SECTION_TYPES.items():
        defaults = {k: plain(v) for k, v in defaults_of(cls).items()}
        assert set(defaults) - set(table[name]) == set(), f"{name}: in the dataclass, not in the table"
        assert set(table[name]) - set(defaults) == set(), f"{name}: in the table, not in the dataclass"
        for key, value in table[name].items():
            assert defaults[key] == value and type(defaults[key]) is type(value), f"{name}.{key}"


def test_every_table_line_has_a_type_comment_that_matches_the_dataclass():
    lines = _table_lines()
    assert set(lines) == set(SECTION_TYPES)
    for name, cls in SECTION_TYPES.items():
        assert set(lines[name]) == {f.name for f in fields(cls)}, name
        for f in fields(cls):
            word, meaning = lines[name][f.name]
            annotation = str(f.type)
            expected = "dict" if annotation.startswith(("Mapping", "dict")) else TABLE_TYPE[annotation]
            assert word == expected, f"{name}.{f.name}: table says ({word}), the dataclass field is {annotation}"
            assert len(meaning) > 8, f"{name}.{f.name}: the meaning is missing"


def _spec_dict(**sections) -> dict:
    return {"line": "l1", "classes": ["a", "b"], "paths": {"root": "."}, **sections}


@pytest.mark.parametrize("raw, message", [
    (_spec_dict(train={"lrr": 0.1}), r"unknown key 'train.lrr'. Did you mean 'lr'\?"),
    (_spec_dict(compress={"qat_lr_facter": 0.2}), r"Did you mean 'qat_lr_factor'\?"),
    (_spec_dict(trian={"lr": 0.1}), r"unknown key 'trian'. Did you mean 'train'\?"),
    (_spec_dict(train={"epochs": "ten"}), r"'train.epochs' must be a whole number, got 'ten'"),
    (_spec_dict(train={"ema": "yes"}), r"'train.ema' must be true or false"),
    (_spec_dict(train={"hsv": 0.5}), r"'train.hsv' must be a list"),
    (_spec_dict(data={"box_tolerance_px": -1.0}), r"data.box_tolerance_px must be >= 0"),
    (_spec_dict(compress={"ort_recipes": ["default", "fastest"]}),
     r"compress.ort_recipes must list one or both of default, fast; got \['default', 'fastest'\]"),
    (_spec_dict(compress={"ort_recipes": []}), r"compress.ort_recipes must list one or both of default, fast"),
])
def test_bad_spec_values_are_refused_with_the_key_named(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=message):
        LineSpec.from_dict(raw, tmp_path, where="line spec x.yaml")


def test_unknown_section_and_key_on_the_command_line(tmp_path, capsys):
    spec = LineSpec.from_dict(_spec_dict(), tmp_path)
    with pytest.raises(ConfigError, match=r"command line: unknown section 'trian'.*Did you mean 'train'"):
        spec.with_cli({"trian": {"lr": 0.1}})
    with pytest.raises(ConfigError, match=r"command line: 'train.lr' must be a finite number, got 'fast'"):
        spec.with_cli({"train": {"lr": "fast"}})
    path = spec.save(tmp_path / "l1.yaml")
    assert main(["train", str(path), "--set", "trian.lr=0.1"]) == 2
    assert "unknown section 'trian'" in capsys.readouterr().err
    assert main(["train", str(path), "--set", "lrr=0.1"]) == 2  # a bare key is a train setting
    assert "unknown key 'train.lrr'. Did you mean 'lr'?" in capsys.readouterr().err
    assert main(["train", str(path), "--set", "novalue"]) == 2
    assert "[SECTION.]KEY=VALUE" in capsys.readouterr().err


def test_override_order_is_defaults_then_spec_then_command_line(tmp_path):
    spec = LineSpec.from_dict(_spec_dict(train={"lr": 0.02, "batch_size": 4}, export={"nms_iou": 0.5}), tmp_path)
    assert (spec.settings.train.lr, spec.settings.train.batch_size, spec.settings.train.epochs) == (0.02, 4, 60)
    cli = spec.with_cli({"train": {"lr": 0.003}, "export": {"opset": 11}})
    t, e = cli.settings.train, cli.settings.export
    assert (t.lr, t.batch_size, t.epochs, e.nms_iou, e.opset) == (0.003, 4, 60, 0.5, 11)
    assert cli.cli == {"train": {"lr": 0.003}, "export": {"opset": 11}}
    assert spec.settings.train.lr == 0.02  # frozen: the spec without the command line is unchanged
    assert cli.settings == Settings.resolve(("spec", {"train": {"lr": 0.02, "batch_size": 4},
                                                      "export": {"nms_iou": 0.5}}),
                                            ("cli", {"train": {"lr": 0.003}, "export": {"opset": 11}}))


def _cli_spec(spec_file: Path, *argv: str) -> LineSpec:
    """The spec `defectkit train SPEC ARGV` trains with (the CLI's own layer building, no training)."""
    from detect.cli import train_layer

    args = build_parser().parse_args(["train", str(spec_file), *argv])
    return LineSpec.load(spec_file).with_cli(train_layer(args))


def test_argparse_defaults_do_not_repeat_the_table(tmp_path):
    spec_file = LineSpec.from_dict(_spec_dict(train={"epochs": 7}), tmp_path).save(tmp_path / "l1.yaml")
    args = build_parser().parse_args(["train", str(spec_file)])
    from detect.cli import TRAIN_FLAGS, train_layer

    assert all(getattr(args, flag) is None for flag in TRAIN_FLAGS) and train_layer(args) == {}
    assert _cli_spec(spec_file).settings.train.epochs == 7  # the spec's value, not an argparse default


def test_run_settings_round_trip_keeps_the_command_line(tmp_path):
    spec_file = LineSpec.from_dict(_spec_dict(train={"batch_size": 4}), tmp_path).save(tmp_path / "l1.yaml")
    spec = _cli_spec(spec_file, "--lr", "0.003", "--set", "mosaic=0.5", "--set", "export.nms_iou=0.45",
                     "--set", "hsv=[0, 0, 0]")
    run = tmp_path / "runs" / "l1" / "r1"
    run.mkdir(parents=True)
    path = write_run_settings(run, spec, device="cpu", ppdet={"LearningRate": {"base_lr": spec.settings.train.lr}})
    assert path == run / "settings.yaml" and sorted(p.name for p in run.iterdir()) == ["settings.yaml"]
    back = load_run_spec(run)
    assert back.settings == spec.settings and back.settings.train.lr == 0.003
    assert back.settings.train.hsv == (0, 0, 0) and back.settings.export.nms_iou == 0.45
    assert back.cli == {"train": {"mosaic": 0.5, "hsv": [0, 0, 0], "lr": 0.003}, "export": {"nms_iou": 0.45}}
    assert (back.line, back.classes, back.paths, back.source) == (spec.line, spec.classes, spec.paths, spec.source)
    record = read_record(run)
    assert record["device"] == "cpu" and record["ppdet"]["LearningRate"]["base_lr"] == 0.003
    assert record["spec_file"] == str(spec_file.resolve()) and len(record["spec_sha256"]) == 64
    write_run_settings(run, back)  # written again from what was read: the same settings
    assert load_run_spec(run).settings == spec.settings


def test_spec_for_run_reports_a_changed_spec_file_and_does_not_mix_it_in(tmp_path):
    spec_file = LineSpec.from_dict(_spec_dict(train={"batch_size": 4}), tmp_path).save(tmp_path / "l1.yaml")
    spec = _cli_spec(spec_file, "--lr", "0.003")
    run = tmp_path / "run"
    run.mkdir()
    write_run_settings(run, spec)
    notes: list[str] = []
    assert spec_for_run(run, spec_file, warn=notes.append).settings == spec.settings and notes == []
    changed = LineSpec.from_dict(_spec_dict(train={"batch_size": 2, "lr": 0.5}, export={"nms_iou": 0.5}), tmp_path)
    replace(changed, classes=["a", "b", "c"]).save(spec_file)
    used = spec_for_run(run, spec_file, warn=notes.append)
    assert used.settings == spec.settings and used.classes == ["a", "b"]  # the run's record wins
    assert used.settings.train.lr == 0.003 and used.settings.train.batch_size == 4
    assert len(notes) == 1 and "the run's settings.yaml wins" in notes[0]
    assert "train.batch_size: 4 -> 2" in notes[0] and "export.nms_iou: 0.6 -> 0.5" in notes[0]
    assert "classes: ['a', 'b'] -> ['a', 'b', 'c']" in notes[0]
    assert "train.lr" not in notes[0]  # the command line's --lr still applies to the file: no difference


def _legacy_run(tmp_path: Path) -> Path:
    """A run folder as the kit wrote it before settings.yaml: line.yaml (spec copy) + config.yaml (train, ppdet)."""
    run = tmp_path / "runs" / "l1" / "old"
    run.mkdir(parents=True)
    (tmp_path / "data").mkdir()
    spec = LineSpec.from_dict({**_spec_dict(train={"batch_size": 4}), "paths": {"root": "data"}}, tmp_path)
    spec.save(run / "line.yaml")
    train = {**spec.settings.to_dict()["train"], "lr": 0.003, "epochs": 5}  # --lr 0.003 --epochs 5 back then
    (run / "config.yaml").write_text(yaml.safe_dump({"line": "l1", "classes": ["a", "b"], "image_size": 320,
                                                    "model_size": "s", "device": "cpu", "train": train,
                                                    "ppdet": {"epoch": 5}}))
    return run


def test_a_legacy_run_gives_the_migration_command_then_migrates(tmp_path, capsys):
    run = _legacy_run(tmp_path)
    with pytest.raises(ConfigError, match=r"made before runs recorded settings.yaml.*`defectkit migrate-run "):
        load_run_spec(run)
    assert main(["export", "--run", str(run)]) == 2  # a later stage says the same
    assert "defectkit migrate-run" in capsys.readouterr().err
    assert main(["migrate-run", str(run)]) == 0
    assert "settings.yaml" in capsys.readouterr().out
    spec = load_run_spec(run)
    assert spec.settings.train.lr == 0.003 and spec.settings.train.epochs == 5
    assert spec.settings.train.batch_size == 4 and spec.cli == {"train": {"lr": 0.003, "epochs": 5}}
    assert spec.paths.root == (tmp_path / "data").resolve()
    record = read_record(run)
    assert record["device"] == "cpu" and record["ppdet"] == {"epoch": 5}
    with pytest.raises(ConfigError, match="already has settings.yaml"):
        migrate_legacy_run(run)
    assert main(["migrate-run", str(tmp_path)]) == 2
    assert "no line.yaml and config.yaml" in capsys.readouterr().err


def _cli_verbs() -> list[str]:
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    verbs = []
    for name, p in sub.choices.items():  # verbs with actions count once per action (data import, bundle build...)
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        verbs += [f"{name} {n}" for n in nested[0].choices] if nested else [name]
    return verbs


def _with_cli_calls() -> list[str]:
    """file:line of every ``.with_cli(`` call in the kit's own (non-test) code."""
    found = []
    for pkg in KIT_PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "with_cli":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_command_line_is_put_on_a_spec_at_most_once_per_verb():
    verbs = _cli_verbs()
    assert {"train", "export", "migrate-run", "retrain", "augment-preview", "pretrain"} <= set(verbs)
    calls = _with_cli_calls()
    assert 0 < len(calls) <= len(verbs), (len(verbs), calls)
    # never in a stage's internals: building configs, sessions, exports, evaluation, checkpoints
    stage_modules = ("detect/ppyoloe.py", "detect/session.py", "detect/session_state.py", "detect/export.py",
                     "detect/infer.py", "detect/callbacks.py", "detect/checkpoints.py", "detect/freeze.py",
                     "detect/preflight.py")
    assert not [c for c in calls if c.split(":")[0] in stage_modules], calls


def test_the_box_self_test_default_tolerance_is_the_tables_golden_tolerance():
    """The box's fallback tolerance (a bundle without golden_tolerance) must be the table's compress.golden_*:
    the gate judges with the table, so a second set of numbers here would let the two disagree."""
    from edge_runtime.selftest import Tolerance
    from detect.linespec import load_table

    c = load_table()["compress"]
    t = Tolerance()
    assert (t.score, t.box_px, t.box_rel, t.min_score) == (
        c["golden_score_tol"], c["golden_box_px"], c["golden_box_rel"], c["golden_min_score"])
