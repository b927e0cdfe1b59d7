"""5000 hostile bodies per POST endpoint (reports, hard examples): never a 500, and the stored data stays intact.

The bodies come from a seeded generator (Hypothesis is not installed; a seed makes a failure replayable: the
failing body is printed): a valid body built by the box's own code, then mutated — a field replaced by a hostile
value (wrong type, huge, control characters, deep nesting), a key added or renamed, a list element swapped, all
counts scaled together past 2^53 (consistent sums: only the collector's bounds refuse them), or the JSON text
itself cut, flipped or spliced. They go to the real collector app (FastAPI, real SQLite store) in
this process through httpx's ASGI transport: the same routes, dependencies, validation and store as under
uvicorn, without a socket per request (10 000 requests over loopback HTTP took most of the time budget; the
HTTP layer's own limits — 413 before reading, chunked bodies — are tested over a real socket in
test_collector_hardening.py).

Before the fuzz the store holds known reports and hard examples; after it, those rows (a checksum over every
column) and image files are unchanged, every 2xx answer's id is stored exactly once and the row counts are the
known rows plus the accepted mutants, and the app still answers /healthz and stores a new valid report.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from fleet import store
from fleet.settings import CollectorSettings
from tests.test_collector_api import ADMIN, TOK1, hard_example, report, write_tokens

N_PER_ENDPOINT = 5000
SEED = 20261130
HOSTILE = [None, True, False, 0, -1, 2 ** 53 + 1, 2 ** 63, 10 ** 19, -(10 ** 19), 1.5e308, -1e-320, 0.5, "", " ",
           "\n", "\x00", "\u202e", "\ud7ff", "x" * 300, "é" * 70, "../../etc/passwd", "<script>x</script>",
           "0" * 32, "F" * 32, "2026-11-22T10:00:00Z\n", "NaN", [], {}, [[[[]]]], {"a": {"b": {"c": {}}}},
           [None] * 300, {f"k{i}": i for i in range(40)}, "ﬀ\u0000", "'; DROP TABLE reports; --"]


class Mutator:
    """Seeded mutations of a JSON-able object and of its serialised bytes."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def value(self):
        r = self.rng
        if r.random() < 0.15:  # nesting of a random depth, sometimes past the collector's limit of 8
            v = r.choice(HOSTILE)
            for _ in range(r.randrange(2, 14)):
                v = [v] if r.random() < 0.5 else {"n": v}
            return v
        return copy.deepcopy(r.choice(HOSTILE))

    def tree(self, obj, depth: int = 0):
        r = self.rng
        if isinstance(obj, dict) and obj:
            k = r.choice(sorted(obj))
            roll = r.random()
            if roll < 0.55 and depth < 5:
                obj[k] = self.tree(obj[k], depth + 1)
            elif roll < 0.75:
                obj[k] = self.value()
            elif roll < 0.85:
                del obj[k]
            elif roll < 0.93:
                obj[r.choice(["x", k + "\n", k.upper(), "", "é" * 70, "__proto__", k + " "])] = self.value()
            else:
                obj[k] = copy.deepcopy(obj)  # self-similar nesting
            return obj
        if isinstance(obj, list) and obj and r.random() < 0.7:
            i = r.randrange(len(obj))
            obj[i] = self.tree(obj[i], depth + 1) if r.random() < 0.5 else self.value()
            return obj
        if isinstance(obj, str) and obj and r.random() < 0.4:  # a near miss of a valid string
            i = r.randrange(len(obj))
            return obj[:i] + r.choice(["\n", "\x00", "Z", "é", " ", "\\", '"', "ÿ"]) + obj[i + 1:]
        if isinstance(obj, (int, float)) and not isinstance(obj, bool) and r.random() < 0.5:
            return r.choice([-obj, obj * 10 ** r.randrange(1, 30), obj + 0.5, -1, 2 ** 53])
        return self.value()

    def text(self, raw: bytes) -> bytes:
        r = self.rng
        roll, i = r.random(), r.randrange(len(raw))
        if roll < 0.3:
            return raw[:i]  # cut short
        if roll < 0.5:
            b = bytearray(raw)
            for _ in range(r.randrange(1, 8)):
                b[r.randrange(len(b))] = r.randrange(256)  # flipped bytes, often not UTF-8
            return bytes(b)
        if roll < 0.7:
            return raw[:i] + r.choice([b"[" * 50, b"{", b"}", b"\"", b"\\u0000", b"1e400", b"NaN", b"-",
                                       b"9" * 40, b"\xff\xfe", b",,", b"null"]) + raw[i:]
        if roll < 0.85:
            return raw + r.choice([b" ", b"\n", b"x", b"{}", b"]", b"\x00"])  # trailing data
        return r.choice([b"", b"null", b"[]", b"{}", b"0", b'"x"', b"[" * 9 + b"]" * 9, b"\"\\ud800\"", raw * 2])

    def scaled_counts(self, obj: dict) -> dict:
        """Every count of a report times one factor: the sums stay consistent, so the box's own schema passes it
        and only the collector's bounds stand between a 20-digit count and the store's 64-bit columns."""
        k = self.rng.choice([10 ** 15, 2 ** 53, 2 ** 53 + 1, 2 ** 62, 10 ** 19, 10 ** 20])
        c = obj["counts"]
        for key in ("frames", "ok", "ng", "errors"):
            c[key] *= k
        c["per_class"] = {name: n * k for name, n in c["per_class"].items()}
        return obj

    def body(self, valid: dict) -> bytes:
        if "counts" in valid and self.rng.random() < 0.05:
            return json.dumps(self.scaled_counts(copy.deepcopy(valid))).encode()
        if self.rng.random() < 0.7:
            return json.dumps(self.tree(copy.deepcopy(valid)), ensure_ascii=self.rng.random() < 0.5).encode()
        return self.text(json.dumps(valid).encode())


def rows_digest(db_path: Path, ids: dict) -> tuple:
    """(sha256 over every column of the given rows, in id order; sha256 over their image files)."""
    h, img = hashlib.sha256(), hashlib.sha256()
    with store.session(path=db_path) as conn:
        for table, wanted in ids.items():
            cols = "id, device_id, line, bundle_version, " + (
                "window_start, window_end, frames, ng, drift_state, alarm, received_at, body" if table == "reports"
                else "time, max_score, image_path, image_sha256, image_bytes, received_at, meta")
            for row in conn.execute(f"SELECT {cols} FROM {table} ORDER BY id").fetchall():
                if row[0] in wanted:
                    h.update(repr(tuple(row)).encode())
                    if table == "hard_examples":
                        img.update(Path(row["image_path"]).read_bytes())
    return h.hexdigest(), img.hexdigest()


def counts(db_path: Path) -> tuple:
    with store.session(path=db_path) as conn:
        return tuple(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("reports", "hard_examples"))


@pytest.fixture
def app(tmp_path):
    from fleet.app import create_app

    settings = CollectorSettings(db=tmp_path / "c.db", port=0, tokens_file=write_tokens(tmp_path / "tokens.json"),
                                 max_report_bytes=64 * 1024, max_hard_example_bytes=256 * 1024,
                                 rate_per_s=1e9, burst=10 ** 9)  # the rate limit is tested on its own
    return create_app(settings), settings


async def _fuzz(app, bodies: list, in_flight: int = 8) -> list:
    """(status, JSON answer) per body, in order; ``in_flight`` requests at a time, as several boxes post at once
    (and so a request waiting for its worker thread does not leave the CPU idle)."""
    import httpx

    headers = {"Authorization": f"Bearer {TOK1}", "Content-Type": "application/json"}
    out: list = [None] * len(bodies)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://collector") as client:
        async def one(i: int) -> None:
            path, body = bodies[i]
            r = await client.post(path, content=body, headers=headers)
            out[i] = (r.status_code, r.json() if r.content else None)

        for start in range(0, len(bodies), in_flight):
            await asyncio.gather(*(one(i) for i in range(start, min(start + in_flight, len(bodies)))))
    return out


def test_5000_hostile_bodies_per_endpoint_get_no_500_and_leave_the_store_intact(app):
    app, settings = app
    db_path = settings.db
    known = {"reports": [report() for _ in range(20)], "hard_examples": [hard_example() for _ in range(5)]}
    answers = asyncio.run(_fuzz(app, [("/api/v1/reports", json.dumps(r).encode()) for r in known["reports"]] +
                                [("/api/v1/hard-examples", json.dumps(h).encode()) for h in known["hard_examples"]]))
    assert [a[0] for a in answers] == [201] * 25
    known_ids = {"reports": {r["id"] for r in known["reports"]},
                 "hard_examples": {h["meta"]["id"] for h in known["hard_examples"]}}
    before = rows_digest(db_path, known_ids)
    assert counts(db_path) == (20, 5)

    m = Mutator(SEED)
    bodies = []
    for i in range(N_PER_ENDPOINT):
        # half the mutants reuse a stored id: a mutant that validates must not overwrite the stored row
        r = report() if i % 2 else {**report(), "id": known["reports"][i % 20]["id"]}
        bodies.append(("/api/v1/reports", m.body(r)))
        h = hard_example()
        if i % 2 == 0:
            h["meta"]["id"] = known["hard_examples"][i % 5]["meta"]["id"]
        if i % 7 == 0:  # the image itself mutated: cut, flipped bytes, not base64
            h["image_b64"] = base64.b64encode(m.text(base64.b64decode(h["image_b64"]))).decode() \
                if m.rng.random() < 0.7 else m.text(h["image_b64"].encode()).decode("latin-1")
        bodies.append(("/api/v1/hard-examples", m.body(h)))
    answers = asyncio.run(_fuzz(app, bodies))

    by_endpoint = {p: Counter() for p in ("/api/v1/reports", "/api/v1/hard-examples")}
    accepted = {"reports": set(), "hard_examples": set()}
    for (path, body), (status, reply) in zip(bodies, answers):
        by_endpoint[path][status] += 1
        assert status < 500, (path, status, reply, body[:2000])
        assert status in (200, 201, 400, 403, 409, 413, 422), (path, status, reply, body[:2000])
        if status == 201:
            accepted["reports" if path.endswith("reports") else "hard_examples"].add(reply["id"])
    print(f"\nfuzz answers: {dict((p, dict(c)) for p, c in by_endpoint.items())}")
    for path, c in by_endpoint.items():
        assert sum(c.values()) == N_PER_ENDPOINT
        assert c[422] + c[400] > N_PER_ENDPOINT // 2, (path, c)  # the mutations really were refused, mostly
    assert not accepted["reports"] & known_ids["reports"] and not accepted["hard_examples"] & known_ids["hard_examples"]

    # the known rows and images are unchanged; nothing but the accepted mutants was added
    assert rows_digest(db_path, known_ids) == before
    assert counts(db_path) == (20 + len(accepted["reports"]), 5 + len(accepted["hard_examples"]))
    with store.session(path=db_path) as conn:
        ids = store.report_ids(conn)
        assert len(ids) == len(set(ids)) and set(ids) == known_ids["reports"] | accepted["reports"]

    # and the collector still answers and stores
    async def after():
        import httpx

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://collector") as c:
            health = await c.get("/healthz", headers={"Authorization": f"Bearer {ADMIN}"})
            new = report()
            posted = await c.post("/api/v1/reports", json=new, headers={"Authorization": f"Bearer {TOK1}"})
            listed = await c.get("/api/v1/reports?limit=1000", headers={"Authorization": f"Bearer {ADMIN}"})
            return health, new, posted, listed

    health, new, posted, listed = asyncio.run(after())
    assert health.status_code == 200 and health.json()["reports"] == 20 + len(accepted["reports"])
    assert posted.status_code == 201 and new["id"] in {r["id"] for r in listed.json()["reports"]}
