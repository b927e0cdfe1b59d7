"""Drift monitoring on the real edge box (Python 3.9, numpy + OpenCV, no scipy) agrees with the trainer side.

The box builds a reference and runs the monitor; the host computes the same frames' features, loads the
box's ``drift_reference.json`` and must get the same numbers: both sides share one implementation.
"""
from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.drift import DriftMonitor, load_reference
from edge_runtime.drift.synthetic import SHIFTED, synthetic_features
from tests.edgebox import box_json, ensure_edgebox

pytestmark = [pytest.mark.edgebox, pytest.mark.timeout(300)]

BOX_CODE = """
import importlib.util, json, sys, platform
from edge_runtime.drift import DriftMonitor, build_reference, load_reference
from edge_runtime.drift.synthetic import SHIFTED, synthetic_features
out = {out!r}
ref = build_reference(synthetic_features(150, seed=1), class_names=["spot", "scratch", "stain"])
ref.save(out + "/drift_reference.json")
ref = load_reference(out + "/drift_reference.json")
monitor = DriftMonitor(ref)
calm = [monitor.update(f) for f in synthetic_features(250, seed=2)]
shifted = [monitor.update(f) for f in synthetic_features(200, seed=3, style=SHIFTED)]
feats = list(synthetic_features(5, seed=9))
print(json.dumps({{"python": platform.python_version(), "scipy": importlib.util.find_spec("scipy") is not None,
                  "calm": calm, "shifted": shifted, "features": feats, "snapshot": monitor.snapshot()}}))
"""


def test_drift_monitor_runs_on_the_edge_box_and_matches_the_host(tmp_path):
    ensure_edgebox()
    res = box_json(BOX_CODE.format(out=str(tmp_path)), [tmp_path], timeout=240)
    assert res["python"].startswith("3.9") and res["scipy"] is False
    assert "alarm" not in res["calm"]
    assert "alarm" in res["shifted"] and res["shifted"].index("alarm") < 200
    # same frames, same features on both sides (the reference the trainer builds is what the box expects)
    host = list(synthetic_features(5, seed=9))
    for box_f, host_f in zip(res["features"], host):
        assert box_f.keys() == host_f.keys()
        for k, v in host_f.items():
            assert (np.isnan(v) and np.isnan(box_f[k])) or box_f[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    # the box's JSON loads on the host, and the host monitor reaches the box's verdicts
    ref = load_reference(tmp_path / "drift_reference.json")
    monitor = DriftMonitor(ref)
    calm = [monitor.update(f) for f in synthetic_features(250, seed=2)]
    shifted = [monitor.update(f) for f in synthetic_features(200, seed=3, style=SHIFTED)]
    assert (calm, shifted) == (res["calm"], res["shifted"])
    snap, box_snap = monitor.snapshot(), res["snapshot"]
    assert snap["state"] == box_snap["state"] == "alarm"
    for name, f in snap["features"].items():
        assert f["state"] == box_snap["features"][name]["state"], name
        for key in ("psi", "ks_stat", "ks_p"):
            if f[key] is not None:
                assert box_snap["features"][name][key] == pytest.approx(f[key], rel=1e-6, abs=1e-300), (name, key)
