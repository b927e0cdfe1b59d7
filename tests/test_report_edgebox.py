"""Reports from a real edge box: Python 3.9 in the debootstrapped root (scripts/edge_box.sh), standard
library + numpy only, spooling and uploading to the collector running on the host."""
from __future__ import annotations

import json

import pytest

from fleet import store
from fleet.collector import CollectorThread
from fleet.settings import CollectorSettings
from tests.edgebox import ROOT, box_json, ensure_edgebox

pytestmark = [pytest.mark.edgebox, pytest.mark.timeout(300)]
TOKEN = "press01-token-abcdefgh"

BOX_CODE = """
import json, sys
sys.path.insert(0, {root!r})
from edge_runtime.report_builder import ReportBuilder
from edge_runtime.spool import Spool
from edge_runtime.uplink import Uplink
from edge_runtime.hard_examples import HardExampleSampler
spool = Spool({spool!r}, max_bytes=1 << 20)
b = ReportBuilder(device_id="press-01", line="line-a", bundle_version="1.0.0", spool_dir={dir!r})
ids = []
for i in range(4):
    b.record_frame(ng=i == 1, classes=["scratch"] if i == 1 else [], latency_ms=10.0 + i)
    r = b.build(drift={{"brightness": {{"state": "alarm" if i == 3 else "none", "psi": 0.3, "ks_p": 0.01}}}}, spool=spool)
    spool.put("report", r.to_dict(), alarm=r.alarm)
    ids.append(r.id)
he = HardExampleSampler(0.3, 0.7, 10).offer(spool, image={jpeg!r}, device_id="press-01", line="line-a",
    bundle_version="1.0.0", detections=[{{"class": "scratch", "score": 0.5, "box": [0, 0, 5, 5]}}])
res = Uplink({url!r}, "press-01", {token!r}, spool).flush()
print(json.dumps({{"python": sys.version.split()[0], "ids": ids, "he": he, "sent": res.sent,
                  "pending": spool.stats().pending, "numpy_free": "numpy" not in sys.modules}}))
"""


def _jpeg() -> bytes:
    """A real JPEG (made on the host: the box has no numpy here); the collector decodes what it stores."""
    import cv2
    import numpy as np

    return cv2.imencode(".jpg", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()


def test_edge_box_spools_and_reports_to_the_host_collector(tmp_path):
    ensure_edgebox()
    (tmp_path / "tokens.json").write_text(json.dumps({"devices": {"press-01": TOKEN}}))
    c = CollectorThread(CollectorSettings(db=tmp_path / "c.db", port=0, tokens_file=tmp_path / "tokens.json")).start()
    try:
        out = box_json(BOX_CODE.format(root=str(ROOT), spool=str(tmp_path / "spool.db"), dir=str(tmp_path),
                                       url=c.url, token=TOKEN, jpeg=_jpeg()), [tmp_path])
    finally:
        c.stop()
    assert out["python"].startswith("3.9.") and out["sent"] == 5 and out["pending"] == 0
    assert out["numpy_free"]  # reporting needs the standard library only
    with store.session(path=tmp_path / "c.db") as conn:
        assert sorted(store.report_ids(conn)) == sorted(out["ids"])
        assert [h["id"] for h in store.list_hard_examples(conn)] == [out["he"]]
        assert sum(r["alarm"] for r in store.list_reports(conn, limit=10)) == 1
