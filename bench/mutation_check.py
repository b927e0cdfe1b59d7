"""Does the suite fail when a feature it covers breaks? Break each one on purpose and run its tests.

Each mutation replaces one exact snippet of the kit (found exactly once) in a fresh copy of the committed tree
(``git archive HEAD``), then runs the tests that cover that feature with the copy first on PYTHONPATH (so
subprocesses such as ``python -m edge_runtime`` run the mutant too). A mutation the tests do not catch is a
hole in the suite. The same tests are first run unmutated: they must pass, or the check proves nothing.

    python bench/mutation_check.py            # all mutations; prints a table, writes bench/results/mutation_check.json
    python bench/mutation_check.py --only gate_max_drop
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("host_nms_iou", "host NMS suppresses nothing (IoU threshold ignored)",
             "edge_runtime/postprocess.py", "alive = rest[iou <= thr]", "alive = rest[iou <= thr + 2.0]",
             ("tests/test_edge_postprocess.py",)),
    Mutation("golden_tolerance", "the golden self-test's box tolerance is 100x too loose",
             "edge_runtime/selftest.py", "max(tol.box_px, tol.box_rel * side)",
             "100 * max(tol.box_px, tol.box_rel * side)",
             ("tests/test_update_selftest.py", "tests/test_edge_decision.py")),
    Mutation("gate_max_drop", "the compression gate ignores its mAP drop limit",
             "compress/gate.py", "if drop > max_map_drop:", "if drop > max_map_drop + 100.0:",
             ("tests/test_compress_gate.py",)),
    Mutation("report_count_validation", "a report's negative counts are accepted",
             "edge_runtime/wire_report.py", "if not (_is_int(v) and v >= 0):", "if not _is_int(v):",
             ("tests/test_report_schema.py",)),
    Mutation("spool_delete_on_ack", "the spool never deletes an acknowledged item",
             "edge_runtime/spool.py", 'c.execute("DELETE FROM items WHERE id = ?", (item_id,)).rowcount > 0,',
             'c.execute("SELECT id FROM items WHERE id = ?", (item_id,)).rowcount > 0,',
             ("tests/test_spool_uplink.py", "tests/test_spool_durability.py")),
    Mutation("resume_optimizer_restore", "resume creates the optimizer's accumulators but leaves them empty",
             "detect/session_state.py", "        var.set_value(value)\n", "        pass  # mutated: not restored\n",
             ("tests/test_resume.py",)),
)


def committed_tree(dest: Path) -> Path:
    """The committed tree (HEAD) unpacked into ``dest``: what CI runs, without anyone's uncommitted edits."""
    data = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest)
    return dest


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, time.monotonic() - t0, tail[-1] if tail else ""


def check(m: Mutation, work: Path, timeout: float) -> dict:
    base = committed_tree(work / f"{m.name}-base")
    rc, secs, last = run_tests(base, m.tests, timeout)
    result = {"name": m.name, "what": m.what, "tests": list(m.tests), "baseline_rc": rc, "baseline": last,
              "baseline_s": round(secs, 1)}
    if rc != 0:
        result["verdict"] = "baseline fails: check meaningless"
        return result
    mutant = committed_tree(work / f"{m.name}-mutant")
    path = mutant / m.file
    text = path.read_text(encoding="utf-8")
    if text.count(m.find) != 1:
        result["verdict"] = f"snippet found {text.count(m.find)} times in {m.file}: update the mutation"
        return result
    path.write_text(text.replace(m.find, m.replace), encoding="utf-8")
    rc, secs, last = run_tests(mutant, m.tests, timeout)
    result.update(mutant_rc=rc, mutant=last, mutant_s=round(secs, 1),
                  verdict="caught" if rc != 0 else "NOT CAUGHT")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", help="mutation name (repeatable)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per test run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mutation_check.json")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="defectkit-mutants-") as tmp:
        for m in chosen:
            r = check(m, Path(tmp), args.timeout)
            results.append(r)
            print(f"{r['name']:<26} {r['verdict']:<12} baseline: {r['baseline']}  |  mutant: {r.get('mutant', '-')}",
                  flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"commit": commit, "results": results}, indent=2) + "\n")
    missed = [r["name"] for r in results if r["verdict"] != "caught"]
    print(f"{len(results) - len(missed)}/{len(results)} mutations caught" + (f"; not: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
