"""``defectkit pretrain``: a base detector trained by the kit itself, standing in for COCO weights.

Pretrained PP-YOLOE weights live on servers offline factory machines (and this CI) cannot reach, and
PP-YOLOE+ from random initialisation needs far more CPU time than a first fine-tune should take. So the
kit trains its own base model on a large synthetic PCB corpus that is *varied* on purpose (six solder-mask
colours, other seeds than any demo line), and records how it was made next to the weights:
``<name>.pdparams`` + ``<name>.json`` (corpus recipe, training settings, kit commit, metrics, sha256).
Re-running the same command with the same arguments reproduces the file's recipe; it is never a file of
unknown origin. A line then fine-tunes from it with ``train.pretrained`` (a new class count is fine:
mismatched head tensors are skipped and listed).
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.fileio import atomic_write_json
from edge_runtime.modelspec import file_sha256

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_WEIGHTS_DIR = REPO_ROOT / "base_weights"


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that decides the base model; stored beside the weights."""

    name: str = "pcb-base-tiny-320"
    count: int = 1500  # boards in the corpus
    seed: int = 20261122  # corpus seed: no demo or test line uses it
    style: str = "varied"
    image_size: int = 320
    model_size: str = "tiny"
    epochs: int = 40
    batch_size: int = 8
    lr: float = 0.01
    warmup_steps: int = 150
    clip_grad_norm: float = 10.0
    time_budget_min: float = 0.0

    def train_overrides(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "warmup_steps": self.warmup_steps, "clip_grad_norm": self.clip_grad_norm,
                "time_budget_min": self.time_budget_min, "multiscale": False, "eval_interval": 2}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def pretrain(recipe: PretrainRecipe, work_dir: Path, out_dir: Path = BASE_WEIGHTS_DIR) -> Path:
    """Generate the corpus, train on it, and write ``out_dir/<name>.pdparams`` with its provenance JSON."""
    from detect.data.synth import generate_line
    from detect.linespec import LineSpec
    from detect.train import train

    work_dir = Path(work_dir)
    corpus = work_dir / "corpus"
    spec_path = corpus / f"{recipe.name}.yaml"
    if not spec_path.is_file():
        generate_line(corpus, line=recipe.name, count=recipe.count, size=(recipe.image_size, recipe.image_size),
                      seed=recipe.seed, val_fraction=0.1, style=recipe.style,
                      pretrained=False)  # the base is trained from random initialisation
    spec = replace(LineSpec.load(spec_path), image_size=recipe.image_size, model_size=recipe.model_size)
    spec = spec.with_cli({"train": recipe.train_overrides()})  # the recipe is this verb's command line
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()  # the code that trains: taken at the start, not after an hour of other commits
    result = train(spec, work_dir / "run")
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{recipe.name}.pdparams"
    tmp = weights.with_name(f".{weights.name}.tmp")
    shutil.copyfile(result.best_weights, tmp)
    tmp.replace(weights)
    atomic_write_json(out_dir / f"{recipe.name}.json", {
        "schema": "defectkit.base_weights/1",
        "name": recipe.name,
        "file": weights.name,
        "sha256": file_sha256(weights),
        "recipe": asdict(recipe),
        "command": f"defectkit pretrain --name {recipe.name} --count {recipe.count} --seed {recipe.seed} "
                   f"--epochs {recipe.epochs} --minutes {recipe.time_budget_min}",
        "classes": spec.classes,
        "kit_commit": commit,
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metrics": {k: result.metrics[k] for k in ("val", "best_epoch", "epochs_run", "stop_reason", "train_minutes")},
    })
    return weights


def register(subparsers) -> None:
    d = PretrainRecipe()
    p = subparsers.add_parser("pretrain", help="train the kit's own base detector on a varied synthetic corpus")
    p.add_argument("--name", default=d.name, help=f"weights name (default {d.name})")
    p.add_argument("--count", type=int, default=d.count, help=f"boards in the corpus ({d.count})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"corpus seed ({d.seed})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs ({d.epochs})")
    p.add_argument("--minutes", type=float, default=d.time_budget_min, help="time budget, 0 = none")
    p.add_argument("--work", type=Path, default=Path("runs/pretrain"), help="corpus and run folder")
    p.add_argument("--out", type=Path, default=BASE_WEIGHTS_DIR, help="where the weights and JSON go")
    p.set_defaults(func=_run)


def _run(args) -> int:
    recipe = PretrainRecipe(name=args.name, count=args.count, seed=args.seed, epochs=args.epochs,
                            time_budget_min=args.minutes)
    weights = pretrain(recipe, args.work, args.out)
    print(f"base weights: {weights}\nprovenance:   {weights.with_suffix('.json')}")
    return 0
