"""The YOLO11n arm of ``bench/new_line.py``: train from random initialisation, predict the val set as COCO detections.

Runs in the bench's own venv (ultralytics is never a kit dependency), offline (``YOLO_OFFLINE=1``, no weights:
``yolo11n.yaml`` builds the network from its description), with ultralytics' defaults except: ``time`` (the
budget, hours), ``imgsz`` (the kit's input size), ``device=cpu`` and ``plots=False`` (plots fetch a font from
the internet). ``python -m bench.lines.yolo_arm --data D.yaml --val-map M.json --minutes 3 --imgsz 320 --project
DIR --out R.json --stage train`` then the same with ``--stage predict``. Training seconds run from ``on_train_start`` to the last ``on_fit_epoch_end`` (each epoch's
validation inside, the final re-validation of best.pt outside); the last epoch may be cut by the budget
mid-way, so epochs are counted in batches (3.4 = three epochs and 40 % of the fourth).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def train(data: Path, minutes: float, imgsz: int, project: Path, seed: int) -> dict:
    from ultralytics import YOLO

    clock: dict = {"batches": 0}

    def on_train_start(tr) -> None:
        clock["start"] = time.time()

    def on_train_epoch_start(tr) -> None:
        clock["batches"], clock["epoch_start"] = 0, time.time()

    def on_train_epoch_end(tr) -> None:  # before the epoch's validation
        clock["fit_seconds"] = clock.get("fit_seconds", 0.0) + time.time() - clock["epoch_start"]

    def on_train_batch_end(tr) -> None:
        clock["batches"] += 1

    def on_fit_epoch_end(tr) -> None:
        clock["end"] = time.time()
        clock["epochs"] = tr.epoch + min(1.0, clock["batches"] / max(1, len(tr.train_loader)))

    model = YOLO("yolo11n.yaml")
    for name, fn in [("on_train_start", on_train_start), ("on_train_epoch_start", on_train_epoch_start),
                     ("on_train_epoch_end", on_train_epoch_end), ("on_train_batch_end", on_train_batch_end), ("on_fit_epoch_end", on_fit_epoch_end)]:
        model.add_callback(name, fn)
    model.train(data=str(data), time=minutes / 60.0, imgsz=imgsz, device="cpu", project=str(project), name="yolo",
                exist_ok=True, plots=False, seed=seed, verbose=False)
    best = Path(model.trainer.best)
    return {"best": str(best if best.is_file() else model.trainer.last), "epochs": round(clock.get("epochs", 0), 2),
            "train_seconds": round(clock.get("end", clock.get("start", 0)) - clock.get("start", 0), 1),
            "fit_seconds": round(clock.get("fit_seconds", 0.0), 1),
            "batch": model.trainer.batch_size, "ultralytics_time_h": minutes / 60.0}


def predict(weights: Path, val_map: dict[str, int], imgsz: int) -> list[dict]:
    """COCO detections (category ids 1..K, xywh pixels) at conf 0.001, ultralytics' val settings otherwise."""
    from ultralytics import YOLO

    model = YOLO(str(weights))
    dets = []
    for path, image_id in val_map.items():
        r = model.predict(path, conf=0.001, iou=0.7, imgsz=imgsz, max_det=300, device="cpu", verbose=False)[0]
        for (x0, y0, x1, y1), score, cls in zip(r.boxes.xyxy.tolist(), r.boxes.conf.tolist(), r.boxes.cls.tolist()):
            dets.append({"image_id": image_id, "category_id": int(cls) + 1, "score": round(float(score), 5),
                         "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]})
    return dets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--val-map", required=True, type=Path, help="JSON {image path: COCO image id}")
    ap.add_argument("--minutes", required=True, type=float)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--project", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path, help="result JSON (train writes it, predict adds to it)")
    ap.add_argument("--stage", choices=("train", "predict"), required=True,
                    help="two commands, so the bench can time and count the CPU of training alone")
    args = ap.parse_args(argv)
    os.environ["YOLO_OFFLINE"] = "1"
    if args.stage == "train":
        import torch
        import ultralytics

        result = train(args.data, args.minutes, args.imgsz, args.project, args.seed)
        result.update({"ultralytics": ultralytics.__version__, "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads()})
    else:
        result = json.loads(args.out.read_text())
        result["detections"] = predict(Path(result["best"]), json.loads(args.val_map.read_text()), args.imgsz)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
