"""Seconds per training step, backbone frozen vs. full fine-tune, same model, input size and batch.

    python bench/train_speed.py [--model-size s] [--image-size 320] [--batch 4] [--steps 10] [--rounds 2]

One process builds the real training session (``detect.session.build_session``: ppdet Trainer, the kit's
seeded loader and callbacks) for each mode on the same synthetic line, skips ``--warmup`` steps and
times ``--steps`` steps: the whole step (loading + forward + backward + update) and the compute part
alone (from the batch being ready to the end of the update). Modes alternate ``--rounds`` times so a
change of machine load hits both; medians are reported with the frozen/full ratio (issue 3 goal: <= 0.67).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zlib  # noqa: E402,F401  -- before paddle (import-order segfault, STACK.md)


def time_steps(spec, root: Path, freeze: str, batch: int, warmup: int, steps: int) -> dict[str, list[float]]:
    from detect.callbacks import StopTraining
    from detect.ppyoloe import RunPaths
    from detect.session import build_session

    run = RunPaths(root / f"{freeze}-{time.time_ns()}")
    run.root.mkdir(parents=True)
    spec = spec.with_cli({"train": {"freeze": freeze, "batch_size": batch, "epochs": 1, "multiscale": False,
                                    "visualdl": False, "warmup_steps": 5}})
    session = build_session(spec, run)
    from ppdet.engine.callbacks import Callback

    times: dict[str, list[float]] = {"step": [], "compute": []}

    class Clock(Callback):
        last = begin = 0.0

        def on_step_begin(self, status):
            self.begin = time.perf_counter()

        def on_step_end(self, status):
            now = time.perf_counter()
            step = int(status["step_id"])
            if step >= warmup:
                times["compute"].append(now - self.begin)
                times["step"].append(now - self.last)
            self.last = now
            if step + 1 >= warmup + steps:
                raise StopTraining("bench done")

    session.trainer.register_callbacks([Clock(session.trainer)])
    try:
        session.trainer.train(validate=False)
    except StopTraining:
        pass
    finally:
        session.cb.progress.close()
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-size", default="s")
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode and round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--freeze", default="backbone", help="the frozen mode's train.freeze")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    from detect.data.synth import generate_line
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    with tempfile.TemporaryDirectory() as tmp:
        count = args.batch * (args.warmup + args.steps) + 4
        spec = generate_line(Path(tmp) / "line", line="bench", count=int(count / 0.9) + 1,
                             size=(args.image_size, args.image_size), seed=1, val_fraction=0.1, progress=False)
        spec = dataclasses.replace(spec, model_size=args.model_size, image_size=args.image_size)
        results: dict[str, dict[str, list[float]]] = {"full": {"step": [], "compute": []},
                                                       args.freeze: {"step": [], "compute": []}}
        for _ in range(args.rounds):
            for mode, freeze in (("full", "none"), (args.freeze, args.freeze)):
                got = time_steps(spec, Path(tmp), freeze, args.batch, args.warmup, args.steps)
                for key in got:
                    results[mode][key] += got[key]
    med = {mode: {k: statistics.median(v) for k, v in r.items()} for mode, r in results.items()}
    out = {
        "model_size": args.model_size, "image_size": args.image_size, "batch": args.batch,
        "steps_per_mode": args.steps * args.rounds, "device": paddle.device.get_device(),
        "seconds_per_step": {m: round(v["step"], 3) for m, v in med.items()},
        "compute_seconds_per_step": {m: round(v["compute"], 3) for m, v in med.items()},
        "ratio_frozen_full": round(med[args.freeze]["step"] / med["full"]["step"], 3),
        "ratio_frozen_full_compute": round(med[args.freeze]["compute"] / med["full"]["compute"], 3),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
