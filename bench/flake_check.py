"""The tests that wait on other processes, threads or the clock, run again and again under full CPU load.

A test that passes only on an idle machine fails on CI some day. This runs the set below ``--rounds`` times in
a row while busy processes keep every core at 100 % (a pure-Python loop per core; `stress-ng` is not needed),
and counts failures per test. The set is the issue's list of tests that used to flake (timing windows, sleeps,
unseeded jitter, kill -9 at random moments) plus the newer ones that wait on real servers.

    python bench/flake_check.py --rounds 20          # writes bench/results/flake_check.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLAKY_SET = (
    "tests/test_spool_uplink.py",
    "tests/test_resume.py::test_sigkill_at_three_random_moments_then_the_run_finishes_intact",
    "tests/test_run_collector.py",
    "tests/test_run_loop.py",
    "tests/test_sources_watch.py",
    "tests/test_sources_stream.py",
    "tests/test_spool_durability.py",
    "tests/test_collector_outage.py",
    "tests/test_channel_kill.py",
    "tests/test_edge_demo_script.py",
)


def _burn(stop: "mp.synchronize.Event") -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--burners", type=int, default=os.cpu_count() or 2, help="busy processes (default: one per core)")
    ap.add_argument("--tests", nargs="*", default=list(FLAKY_SET))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "flake_check.json")
    args = ap.parse_args()
    stop = mp.Event()
    burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(args.burners)]
    for b in burners:
        b.start()
    rounds = []
    t0 = time.monotonic()
    try:
        for i in range(1, args.rounds + 1):
            r0 = time.monotonic()
            # PYTHONPATH: the tests' own `python -m defectkit` subprocesses import this checkout, not whichever
            # checkout the venv's editable install points at (a worktree run mixed two versions of the kit)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *args.tests],
                                  cwd=ROOT, capture_output=True, text=True, env=env)
            failed = [ln.split(" ", 2)[1] for ln in proc.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
            rounds.append({"round": i, "rc": proc.returncode, "failed": failed, "summary": last,
                           "seconds": round(time.monotonic() - r0, 1)})
            print(f"round {i:2d}: rc {proc.returncode}  {last}", flush=True)
            if proc.returncode:  # keep the whole output of a failing round: a flake is only fixable from its traceback
                log = args.out.with_name(f"{args.out.stem}_round{i}.log")
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
                print(f"          failed: {' '.join(failed)}  (output: {log})", flush=True)
    finally:
        stop.set()
        for b in burners:
            b.join(timeout=5)
    failures = sum(1 for r in rounds if r["rc"] != 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": rounds, "burners": args.burners, "tests": args.tests,
                                    "failed_rounds": failures, "minutes": round((time.monotonic() - t0) / 60, 1)},
                                   indent=2) + "\n")
    print(f"{args.rounds - failures}/{args.rounds} rounds passed under load ({args.burners} busy processes)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
