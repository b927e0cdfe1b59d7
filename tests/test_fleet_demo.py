"""Issue 10 item 7: the fleet demo's driver end to end (``defectkit fleet-demo``, what scripts/fleet_demo.sh runs),
with smaller sizes: real collector, real box processes, real retrain. The timeline must show each decision."""
from __future__ import annotations

import json

import pytest

from defectkit.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_fleet_demo_runs_the_whole_loop(tmp_path, capsys):
    out = tmp_path / "fleet"
    assert main(["fleet-demo", "--out", str(out), "--shifted", "40", "--hard", "6",
                 "--window", "10s"]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC GROUND TRUTH STANDS IN FOR THE LABELLER" in printed
    rows = json.loads((out / "timeline.json").read_text())
    events = [r["event"] for r in rows]
    order = ["DRIFT ALARM", "hard examples exported", "retrain passed its forgetting gate", "v2.0.0 pushed",
             "canary box-1 runs 2.0.0", "rollout PROMOTED", "every box runs v2", "v3.0.0 pushed",
             "rollout ROLLED_BACK", "after the rollback"]
    at = [next(i for i, e in enumerate(events) if e.startswith(name)) for name in order]
    assert at == sorted(at), events
    alarm = rows[at[0]]
    assert alarm["alarmed"] and alarm["bundle"] == "1.0.0"
    labelled = rows[at[1]]
    assert labelled["images"] >= 6 and labelled["true_boxes"] > 0
    assert rows[at[2]]["status"] == "passed"
    promoted = rows[at[5]]
    assert promoted["canary_frames"] >= 20 and promoted["baseline_frames"] > 0
    rolled = rows[at[8]]
    assert "canary box box-2: update of 3.0.0 failed" in rolled["event"] and "self-test" in rolled["event"]
    assert rows[at[9]]["active"] == "2.0.0" and set(rows[at[9]]["boxes_on"].values()) == {"2.0.0"}
    assert (out / "data" / "hard" / "annotations" / "all.json").is_file()
    assert json.loads((out / "data" / "hard" / "annotations" / "all.json").read_text())["info"]["reviewed"] is True
