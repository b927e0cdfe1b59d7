"""``defectkit pretrain``: a base detector trained by the kit itself, standing in for COCO weights.

Pretrained PP-YOLOE weights live on servers offline factory machines (and this CI) cannot reach, and
PP-YOLOE+ from random initialisation needs far more CPU time than a first fine-tune should take. So the
kit trains its own base model on a large synthetic corpus that is *varied* on purpose, and records how it
was made next to the weights: ``<name>.pdparams`` + ``<name>.json`` (corpus recipe, texture sources and
licences, training settings, kit commit, metrics, sha256). Two corpora:

- ``pcb``: synthetic PCBs (six solder-mask colours, other seeds than any demo line);
- ``surfaces``: many materials, grey and colour, non-square frames, uneven light, six transferable defect
  shapes (:mod:`detect.data.surfaces`) -- for lines that are not PCBs.

A pretrain takes CPU hours, so it is resumable: the work folder keeps the recipe (``recipe.json``), the
corpus (regenerated identically if deleted: it depends only on its seed) and the run's checkpoints;
``--resume`` continues it and ``--publish`` writes the best weights so far with provenance marked partial.
A line then fine-tunes from the weights with ``train.pretrained`` (mismatched head tensors are skipped).
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError, UserInputError
from edge_runtime.fileio import atomic_write_json
from edge_runtime.modelspec import file_sha256

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_WEIGHTS_DIR = REPO_ROOT / "base_weights"
CORPORA = ("pcb", "surfaces")


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that decides the base model; stored beside the weights."""

    name: str = "pcb-base-tiny-320"
    count: int = 1500  # images in the corpus
    seed: int = 20261122  # corpus seed: no demo, test or measuring line uses it
    style: str = "varied"  # pcb corpus only: board style
    image_size: int = 320
    model_size: str = "tiny"
    epochs: int = 40
    batch_size: int = 8
    lr: float = 0.01
    warmup_steps: int = 150
    clip_grad_norm: float = 10.0
    time_budget_min: float = 0.0
    corpus: str = "pcb"
    eval_interval: int = 2

    def train_overrides(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "warmup_steps": self.warmup_steps, "clip_grad_norm": self.clip_grad_norm,
                "time_budget_min": self.time_budget_min, "multiscale": False, "eval_interval": self.eval_interval}

    def command(self, work_dir: Path | None = None) -> str:
        work = f" --work {shlex.quote(str(work_dir))}" if work_dir else ""
        return (f"defectkit pretrain --corpus {self.corpus} --name {self.name} --model-size {self.model_size} "
                f"--count {self.count} --seed {self.seed} --epochs {self.epochs} --minutes {self.time_budget_min:g}"
                f"{work}")


_SURFACES = PretrainRecipe(name="surfaces-base-tiny-320", corpus="surfaces", count=3000, seed=20261130, style="",
                           eval_interval=1)
# Named recipes: `--corpus C --model-size S` picks "<C>-base-<S>-320"; flags override single fields.
RECIPES: dict[str, PretrainRecipe] = {
    "pcb-base-tiny-320": PretrainRecipe(),
    "surfaces-base-tiny-320": _SURFACES,
    "surfaces-base-s-320": replace(_SURFACES, name="surfaces-base-s-320", model_size="s", epochs=60),
}
# A resumed pretrain may change only these (they do not alter what one epoch computes).
RESUMABLE_FIELDS = ("epochs", "time_budget_min")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def surface_recipe(recipe: PretrainRecipe):
    from detect.data.surfaces import SurfaceRecipe

    return SurfaceRecipe(count=recipe.count, seed=recipe.seed)


def corpus_record(recipe: PretrainRecipe) -> dict[str, Any]:
    """What the corpus is made of and where its textures come from (for the provenance JSON)."""
    if recipe.corpus == "surfaces":
        from detect.data.surfaces import TEXTURE_SOURCES
        from detect.data.surfaces_defects import SURFACE_CLASSES
        from detect.data.surfaces_textures import FAMILIES

        return {"kind": "surfaces", "generator": "detect/data/surfaces.py", "recipe": asdict(surface_recipe(recipe)),
                "families": list(FAMILIES), "classes": list(SURFACE_CLASSES), "texture_sources": list(TEXTURE_SOURCES)}
    return {"kind": "pcb", "generator": "detect/data/synth.py", "count": recipe.count, "seed": recipe.seed,
            "style": recipe.style, "texture_sources": [{"source": "procedural PCB drawing (detect/data/board.py)",
                                                        "licence": "the kit's own code"}]}


def build_corpus(recipe: PretrainRecipe, corpus: Path) -> Path:
    """The corpus's line spec: reused from disk when it was made by this recipe, else (re)generated."""
    spec_path = corpus / f"{recipe.name}.yaml"
    if recipe.corpus == "surfaces":
        from detect.data.surfaces import generate_surfaces

        made = corpus / "surfaces.json"
        wanted = asdict(surface_recipe(recipe))
        if spec_path.is_file() and made.is_file():
            stored = json.loads(made.read_text()).get("recipe")
            if stored == json.loads(json.dumps(wanted)):  # tuples become lists in JSON
                return spec_path
        generate_surfaces(corpus, surface_recipe(recipe), line=recipe.name, image_size=recipe.image_size,
                          model_size=recipe.model_size)
        return spec_path
    if not spec_path.is_file():
        from detect.data.synth import generate_line

        generate_line(corpus, line=recipe.name, count=recipe.count, size=(recipe.image_size, recipe.image_size),
                      seed=recipe.seed, val_fraction=0.1, style=recipe.style,
                      pretrained=False)  # the base is trained from random initialisation
    return spec_path


def _check_recipe(recipe: PretrainRecipe, work_dir: Path, resume: bool) -> None:
    """Keep ``work_dir/recipe.json``; a resume must use the recipe the run started with (up to RESUMABLE_FIELDS)."""
    path = work_dir / "recipe.json"
    if not path.is_file():
        if resume:
            raise UserInputError(f"--resume: {work_dir} holds no pretrain (no recipe.json). Start one without "
                                 f"--resume: `{recipe.command(work_dir)}`.")
        atomic_write_json(path, asdict(recipe))
        atomic_write_json(work_dir / "started.json", {  # the first session's start and code, kept across resumes
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "kit_commit": git_commit()})
        return
    stored = json.loads(path.read_text())
    now = json.loads(json.dumps(asdict(recipe)))
    diff = [f"{k}: {stored.get(k)!r} in the run, {v!r} now" for k, v in now.items()
            if stored.get(k) != v and k not in RESUMABLE_FIELDS]
    if diff:
        raise ConfigError(f"{path} was started with another recipe ({'; '.join(diff)}). Resume with the same flags, "
                          f"or choose another --work folder.")
    from detect.checkpoints import list_checkpoints

    started = bool(list_checkpoints(work_dir / "run" / "checkpoints"))
    if not resume and started:
        raise UserInputError(f"{work_dir} already holds a pretrain run: continue it with "
                             f"`{recipe.command(work_dir)} --resume`, or choose another --work folder.")
    if resume and not started:
        raise UserInputError(f"the pretrain in {work_dir} stopped before its first checkpoint (end of epoch 1): "
                             f"nothing to resume. Start it again without --resume: `{recipe.command(work_dir)}` "
                             "(the corpus on disk is reused).")
    atomic_write_json(path, {**stored, **{k: now[k] for k in RESUMABLE_FIELDS}})


def pretrain(recipe: PretrainRecipe, work_dir: Path, out_dir: Path = BASE_WEIGHTS_DIR, resume: bool = False) -> Path:
    """Build (or reuse) the corpus, train on it (or continue the run), and write ``out_dir/<name>.pdparams`` with
    its provenance JSON."""
    from detect.linespec import LineSpec
    from detect.train import resume as resume_run
    from detect.train import train

    if recipe.corpus not in CORPORA:
        raise UserInputError(f"pretrain: unknown corpus '{recipe.corpus}'; choose one of {', '.join(CORPORA)}.")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_recipe(recipe, work_dir, resume)
    spec_path = build_corpus(recipe, work_dir / "corpus")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()  # the code that trains: taken at the start, not after an hour of other commits
    if resume:
        result = resume_run(work_dir / "run", {"train": {k: getattr(recipe, k) for k in RESUMABLE_FIELDS}})
        spec = LineSpec.load(spec_path)
    else:
        spec = replace(LineSpec.load(spec_path), image_size=recipe.image_size, model_size=recipe.model_size)
        spec = spec.with_cli({"train": recipe.train_overrides()})  # the recipe is this verb's command line
        result = train(spec, work_dir / "run")
    return publish(recipe, work_dir, out_dir, metrics=result.metrics, started=started, commit=commit,
                   classes=list(spec.classes))


def _run_progress(run_root: Path) -> dict[str, Any]:
    """Epochs done, best epoch and training minutes of a run so far (from its history)."""
    from detect.plots import read_history

    history = read_history(run_root / "history.jsonl")
    evaluated = [h for h in history if "map50_95" in h]
    best = max(evaluated, key=lambda h: h["map50_95"]) if evaluated else {}
    return {"epochs_run": history[-1]["epoch"] if history else 0, "best_epoch": best.get("epoch"),
            "train_minutes": round(sum(h.get("train_seconds", 0.0) for h in history) / 60.0, 2)}


def publish(recipe: PretrainRecipe, work_dir: Path, out_dir: Path = BASE_WEIGHTS_DIR, metrics: dict | None = None,
            started: str | None = None, commit: str | None = None, classes: list[str] | None = None) -> Path:
    """Copy the run's best weights to ``out_dir/<name>.pdparams`` and write the provenance JSON beside them.

    Without ``metrics`` (a run still going, or stopped): the best weights so far are evaluated on the corpus's
    val split, and the record says it is partial and how to resume."""
    from detect.ppyoloe import RunPaths

    work_dir = Path(work_dir)
    run = RunPaths(work_dir / "run")
    if not run.best_weights.is_file():
        raise UserInputError(f"{run.root} has no best weights yet (no evaluation finished); publish after the first "
                             f"epoch, or train with `{recipe.command(work_dir)}`.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{recipe.name}.pdparams"
    tmp = weights.with_name(f".{weights.stem}-tmp.pdparams")  # ppdet takes one dot, before pdparams
    shutil.copyfile(run.best_weights, tmp)  # copy first: the run may write a new best meanwhile
    if metrics is None and run.metrics.is_file() and run.metrics.stat().st_mtime >= run.best_weights.stat().st_mtime:
        metrics = json.loads(run.metrics.read_text())  # the run ended (e.g. its time budget): its own figures
    if metrics is None:
        metrics = {**_run_progress(run.root), "stop_reason": "published while training (best weights so far)",
                   "val": _evaluate(recipe, work_dir, tmp)}
    tmp.replace(weights)
    partial = int(metrics.get("epochs_run") or 0) < recipe.epochs
    record = {
        "schema": "defectkit.base_weights/1",
        "name": recipe.name,
        "file": weights.name,
        "sha256": file_sha256(weights),
        "recipe": asdict(recipe),
        "command": recipe.command(),
        "corpus": corpus_record(recipe),
        "classes": classes or _classes(recipe, work_dir),
        **_first_session(work_dir, started, commit),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metrics": {k: metrics.get(k) for k in ("val", "best_epoch", "epochs_run", "stop_reason", "train_minutes")},
        "partial": partial,
        "run_dir": str(run.root),
    }
    if partial:
        record["resume_command"] = f"{recipe.command(work_dir)} --resume"
        record["note"] = (f"partial: {metrics.get('epochs_run')} of {recipe.epochs} epochs; resume with "
                          f"`{record['resume_command']}` (the run folder keeps the corpus and checkpoints)")
    atomic_write_json(out_dir / f"{recipe.name}.json", record)
    return weights


def _first_session(work_dir: Path, started: str | None, commit: str | None) -> dict[str, Any]:
    """``kit_commit`` and ``started`` of the run's first session; the latest session's when they differ."""
    path = Path(work_dir) / "started.json"
    first = json.loads(path.read_text()) if path.is_file() else {}
    out = {"kit_commit": first.get("kit_commit") or commit or git_commit(), "started": first.get("started") or started}
    if first.get("note"):
        out["started_note"] = first["note"]
    if first and (commit, started) != (None, None) and started != first.get("started"):
        out["last_session"] = {"started": started, "kit_commit": commit}
    return out


def _classes(recipe: PretrainRecipe, work_dir: Path) -> list[str]:
    from detect.linespec import LineSpec

    return list(LineSpec.load(Path(work_dir) / "corpus" / f"{recipe.name}.yaml").classes)


def _evaluate(recipe: PretrainRecipe, work_dir: Path, weights: Path) -> dict[str, Any]:
    """COCO figures of ``weights`` on the corpus's val split, with the run's own settings."""
    from detect.infer import evaluate_weights
    from detect.run_settings import load_run_spec

    spec = load_run_spec(work_dir / "run")
    return evaluate_weights(spec, weights, spec.paths.val, work_dir / "publish_eval").to_dict()


def stored_recipe(work_dir: Path, asked: PretrainRecipe) -> PretrainRecipe:
    """The recipe the run in ``work_dir`` records (the truth for its provenance), if it is the one asked for."""
    path = Path(work_dir) / "recipe.json"
    if not path.is_file():
        return asked
    stored = json.loads(path.read_text())
    if stored.get("name") != asked.name:
        raise UserInputError(f"{work_dir} holds the pretrain '{stored.get('name')}', not '{asked.name}': pass the "
                             f"same --corpus/--model-size/--name as when it started.")
    return PretrainRecipe(**{f.name: stored[f.name] for f in fields(PretrainRecipe) if f.name in stored})


def recipe_from_args(args) -> PretrainRecipe:
    """The named recipe of ``--corpus``/``--model-size`` (or ``--name``), with the flags given on top."""
    name = args.name or f"{args.corpus or 'pcb'}-base-{args.model_size or 'tiny'}-320"
    base = RECIPES.get(name) or replace(RECIPES[f"{args.corpus or 'pcb'}-base-tiny-320"], name=name)
    given = {f.name: getattr(args, f.name) for f in fields(PretrainRecipe)
             if f.name not in ("name",) and getattr(args, f.name, None) is not None}
    recipe = replace(base, **given)
    if recipe.corpus not in CORPORA:
        raise UserInputError(f"pretrain: unknown corpus '{recipe.corpus}'; choose one of {', '.join(CORPORA)}.")
    return recipe


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="train the kit's own base detector on a varied synthetic corpus")
    p.add_argument("--corpus", choices=CORPORA, help="pcb boards or varied surfaces (default pcb)")
    p.add_argument("--model-size", dest="model_size", choices=("tiny", "s"), help="model (default tiny)")
    p.add_argument("--name", help="weights name (default <corpus>-base-<model-size>-320: a named recipe)")
    p.add_argument("--count", type=int, help="images in the corpus (recipe's)")
    p.add_argument("--seed", type=int, help="corpus seed (recipe's)")
    p.add_argument("--epochs", type=int, help="epochs (recipe's)")
    p.add_argument("--minutes", dest="time_budget_min", type=float, help="time budget of this session, 0 = none")
    p.add_argument("--work", type=Path, default=Path("runs/pretrain"), help="corpus and run folder")
    p.add_argument("--out", type=Path, default=BASE_WEIGHTS_DIR, help="where the weights and JSON go")
    p.add_argument("--resume", action="store_true", help="continue the pretrain in --work from its last checkpoint")
    p.add_argument("--publish", action="store_true", help="only write the run's best weights so far (partial)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    recipe = recipe_from_args(args)
    if args.publish:
        weights = publish(stored_recipe(args.work, recipe), args.work, args.out)
    else:
        weights = pretrain(recipe, args.work, args.out, resume=args.resume)
    print(f"base weights: {weights}\nprovenance:   {weights.with_suffix('.json')}")
    return 0
