"""The rollout decision, table-driven: promote, roll back and halt, or wait; time is passed in."""
from __future__ import annotations

import pytest

from edge_runtime.errors import UserInputError
from fleet.rollout import Policy, Seen, choose_canary, decide, parse_canary, parse_duration

T0, W = 1_000_000.0, 1800.0
NEW, OLD = "2.0.0", "1.0.0"


def seen(dev, at, version=NEW, frames=100, ng=3, drift="none", selftest=None, event=""):
    return Seen(device=dev, received_at=T0 + at, version=version, frames=frames, ng=ng, drift=drift,
                selftest=selftest, update_event=event)


STABLE = [seen("s1", 60, OLD, 100, 3), seen("s2", 60, OLD, 100, 2), seen("s3", 900, OLD, 100, 4)]
OK_CANARY = [seen("c1", 100), seen("c2", 200), seen("c1", 1700), seen("c2", 1750)]

CASES = [
    # name, canary reports, baseline, now offset, action, reason fragment
    ("healthy after the window", OK_CANARY, STABLE, W + 1, "promote", "every canary box ran 2.0.0"),
    ("healthy inside the window", OK_CANARY, STABLE, W - 1, "wait", "2/2 canary boxes on 2.0.0"),
    ("self-test failed", OK_CANARY + [seen("c2", 300, selftest="failed")], STABLE, 400, "rollback",
     "canary box c2: golden self-test failed on 2.0.0"),
    ("refused update event after the start", [seen("c1", 100, OLD, event="1970-01-12T13:50:00Z refused : pulled: "
                                                                          "self-test failed")],
     STABLE, 200, "rollback", "canary box c1: update of 2.0.0 failed"),
    ("old refused event before the start is ignored", [seen("c1", 100, event="1970-01-01T00:00:01Z refused : x"),
                                                       seen("c2", 100)],
     STABLE, W + 1, "promote", "every canary box"),
    ("crash-loop revert event", [seen("c1", 100), seen("c1", 500, OLD, event="1970-01-12T13:55:00Z reverted 2.0.0: "
                                                                              "crashed 3 times")],
     STABLE, 600, "rollback", "update of 2.0.0 failed"),
    ("back on the old version after the new", [seen("c1", 100), seen("c2", 100), seen("c1", 500, OLD)], STABLE, 600,
     "rollback", "canary box c1 ran 2.0.0, then reported 1.0.0 again"),
    ("NG rate above the band", [seen("c1", 100, ng=30), seen("c2", 100, ng=30)], STABLE, 300, "rollback",
     "canary NG rate 0.300 is outside the band 0.030 ± 0.060"),
    ("NG rate inside the relative band", [seen("c1", 100, ng=8), seen("c2", 100, ng=8)], STABLE, W + 1, "promote",
     "NG rate in band"),
    ("too few frames to judge NG yet", [seen("c1", 100, frames=5, ng=5), seen("c2", 100, frames=5, ng=5)], STABLE,
     W + 1, "wait", "only 10 canary frames on 2.0.0 (need 20)"),
    ("a canary box silent after the window", [seen("c1", 100)], STABLE, W + 1, "wait",
     "canary box(es) c2 never reported on 2.0.0 yet"),
    ("a canary box silent after twice the window", [seen("c1", 100)], STABLE, 2 * W, "rollback",
     "canary box(es) c2 never reported on 2.0.0 within 2x the window"),
    ("drift worse on the canary", [seen("c1", 100, drift="alarm"), seen("c2", 100)], STABLE, W + 1, "rollback",
     "drift worse on the canary: 0.50 of its reports in alarm against 0.00"),
    ("no baseline: promoted, band not checked", OK_CANARY, [], W + 1, "promote", "NG band not checked"),
    ("reports from before the start do not count", [seen("c1", -10), seen("c2", -10)], STABLE, W + 1, "wait",
     "c1, c2 never reported"),
]


@pytest.mark.parametrize("name, canary, baseline, now, action, reason", CASES, ids=[c[0] for c in CASES])
def test_decide(name, canary, baseline, now, action, reason):
    d = decide(version=NEW, canary=["c1", "c2"], started_at=T0, window_s=W, now=T0 + now, canary_reports=canary,
               baseline=baseline, policy=Policy())
    assert (d.action, reason in d.reason) == (action, True), d.reason
    assert d.figures["window_s"] == W and d.figures["canary"] == ["c1", "c2"]


def test_figures_carry_the_numbers():
    d = decide(version=NEW, canary=["c1", "c2"], started_at=T0, window_s=W, now=T0 + W + 1,
               canary_reports=OK_CANARY, baseline=STABLE)
    f = d.figures
    assert (f["canary_frames"], f["canary_ng"], f["baseline_frames"]) == (400, 12, 300)
    assert f["canary_ng_rate"] == pytest.approx(0.03) and f["baseline_ng_rate"] == pytest.approx(0.03)
    assert f["ng_band"] == pytest.approx(0.06) and f["on_new_version"] == ["c1", "c2"]


def test_stricter_policy_changes_the_verdict():
    reports = [seen("c1", 100, ng=8), seen("c2", 100, ng=8)]
    loose = decide(version=NEW, canary=["c1", "c2"], started_at=T0, window_s=W, now=T0 + W + 1,
                   canary_reports=reports, baseline=STABLE)
    strict = decide(version=NEW, canary=["c1", "c2"], started_at=T0, window_s=W, now=T0 + W + 1,
                    canary_reports=reports, baseline=STABLE, policy=Policy(ng_band_abs=0.01, ng_band_rel=0.5))
    assert (loose.action, strict.action) == ("promote", "rollback")


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("90s", 90), ("2h", 7200), ("1d", 86400), ("45", 45),
                                           ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "m30", "-5m"])
def test_parse_duration_refuses(text):
    with pytest.raises(UserInputError, match="e.g. 90s, 30m, 2h"):
        parse_duration(text)


def test_canary_choice():
    devs = [f"d{i:02d}" for i in range(20)]
    a = choose_canary(devs, percent=10, explicit=[], line="l", version="2")
    assert len(a) == 2 and a == choose_canary(devs, percent=10, explicit=[], line="l", version="2")
    assert len(choose_canary(devs[:3], percent=10, explicit=[], line="l", version="2")) == 1
    assert choose_canary(devs, percent=None, explicit=["d03", "d01"], line="l", version="2") == ["d03", "d01"]
    with pytest.raises(UserInputError, match="canary device\\(s\\) zz are not enrolled"):
        choose_canary(devs, percent=None, explicit=["zz"], line="l", version="2")
    assert parse_canary("10%") == 10.0
    with pytest.raises(UserInputError, match="percentage like 10%"):
        parse_canary("ten")
