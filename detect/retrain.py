"""Incremental retrain of a line: from the line's current model, with new data, without forgetting.

``retrain(parent_run, adds)``:
1. merges the parent's data (replayed, ``retrain.replay``) with the new data folders into the run
   (:mod:`detect.retrain_data`); new defect classes are appended to the class list, never inserted;
2. grows the parent's classification head to the new class count, keeping every old row
   (:mod:`detect.head_surgery`), and starts from it with the backbone frozen (``retrain.freeze``) at a
   lower learning rate (``retrain.lr_factor``) for ``retrain.epochs`` (0: from the new data's share,
   :func:`epochs_for_share`), early-stopped on the merged val set: a normal training run of the kit, so
   checkpoints, kill -9 and ``--resume`` behave as in ``defectkit train``. The parent stays beside the
   student as a frozen teacher (:mod:`detect.distill`), optionally with an EWC penalty (:mod:`detect.ewc`);
   ``retrain.json`` records the data version and parent chain (:mod:`detect.retrain_lineage`);
3. judges forgetting (:mod:`detect.forgetting`) and writes ``retrain.json``, ``retrain.md``, ``retrain.png``.

``retrain.json`` is written before training starts (status "training") so ``resume_retrain`` knows the parent.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from detect.forgetting import ForgettingVerdict, judge, markdown, plot
from detect.linespec import LineSpec
from detect.ppyoloe import RunPaths
from detect.retrain_data import Parent, check_lineage, load_parent, merge_data, retrain_spec
from detect.run_settings import load_run_spec
from detect.settings import Layer
from edge_runtime.errors import ConfigError
from edge_runtime.fileio import atomic_write_json, atomic_write_text
from edge_runtime.typedconf import section_dict

RECORD = "retrain.json"


@dataclass
class RetrainResult:
    run: RunPaths
    metrics: dict[str, Any]
    verdict: ForgettingVerdict
    record: dict[str, Any]


def record_path(run: RunPaths) -> Path:
    return run.root / RECORD


def read_record(run_dir: Path | str) -> dict[str, Any] | None:
    """The retrain record of a run, or None for a run that is not a retrain."""
    import json

    path = record_path(RunPaths(Path(run_dir)))
    return json.loads(path.read_text()) if path.is_file() else None


EPOCH_RULE: tuple[tuple[float, int], ...] = ((0.10, 3), (0.30, 5), (0.50, 8), (float("inf"), 10))
"""(share of new images among the line's training images — all the parent's plus the new, however many are
replayed — below which, epochs): the rule of ``retrain.epochs: 0``."""


def epochs_for_share(share: float) -> tuple[int, str]:
    """Epochs of a retrain whose merged training set holds ``share`` new images, and why (for retrain.json)."""
    lower = 0.0
    for limit, epochs in EPOCH_RULE:
        if share < limit:
            span = f"under {limit:.0%}" if lower == 0.0 else (f"{lower:.0%}-{limit:.0%}" if limit != float("inf")
                                                             else f"over {lower:.0%}")
            return epochs, f"new data {share:.1%} of the line's training images ({span}: {epochs} epochs)"
        lower = limit
    raise AssertionError("unreachable: the rule ends at infinity")


def retrain_policy(spec: LineSpec, parent: Parent, added: int, total: int, cli: Layer | None = None,
                   steps_per_epoch: int = 0) -> dict[str, Any]:
    """The retrain's epochs (``retrain.epochs``, else from the new data's share), lr, warmup and early stopping,
    with why. Train settings given on this command line (``cli``, not the parent's recorded overrides) win.

    Warmup: at most one epoch of the retrain's steps. The parent's warmup was sized for a first fine-tune; a
    retrain of a few short epochs (a replayed sample, k new images) would otherwise spend them all warming up
    (measured: with 10 steps in all, the new class stayed at AP50 0.29, bench/retrain_forgetting.py --quick)."""
    r = spec.settings.retrain
    share = added / total if total else 0.0
    given = set((cli or {}).get("train", {}))
    if "epochs" in given:
        epochs, why = spec.settings.train.epochs, "given (train.epochs on the command line)"
    elif r.epochs > 0:
        epochs, why = r.epochs, "given (retrain.epochs)"
    else:
        epochs, why = epochs_for_share(share)
    lr = spec.settings.train.lr if "lr" in given else parent.spec.settings.train.lr * r.lr_factor
    warmup = spec.settings.train.warmup_steps
    if "warmup_steps" not in given and steps_per_epoch > 0:
        warmup = min(warmup, steps_per_epoch)
    return {"epochs": epochs, "why": why, "new_images": added, "train_images": total, "new_share": round(share, 4),
            "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup,
            "rule": "retrain.epochs 0: " + "; ".join(f"share < {lim:g}: {e}" for lim, e in EPOCH_RULE),
            "lr": lr, "lr_why": ("given (train.lr)" if "lr" in given else
                                 f"parent's train.lr {parent.spec.settings.train.lr:g} x retrain.lr_factor {r.lr_factor:g}"),
            "patience": spec.settings.train.patience if "patience" in given else r.patience,
            "early_stopping": "mAP50-95 on the merged val set"}


def retrain_choices(spec: LineSpec, policy: dict[str, Any], init: Path, cli: Layer | None = None) -> LineSpec:
    """``spec`` with the retrain's own training choices: the policy's epochs, lr and patience, ``retrain.freeze``
    and the grown parent weights. A train setting given on this command line (``--set lr=...``) wins."""
    r = spec.settings.retrain
    given = set((cli or {}).get("train", {}))
    choices = {"epochs": policy["epochs"], "lr": policy["lr"], "freeze": r.freeze, "patience": policy["patience"],
               "warmup_steps": policy.get("warmup_steps", spec.settings.train.warmup_steps)}
    choices = {k: v for k, v in choices.items() if k not in given}
    return spec.with_settings(spec.settings.with_values("train", **choices, pretrained=str(init)))


def duplicate_notes(sources: list[dict[str, Any]]) -> list[str]:
    """What retrain.json and the console say about new images that the parent's data already holds."""
    from detect.retrain_data import VAL_TAG

    added = [s for s in sources if s["tag"] != "parent" and s["split"] == "train"]
    val = sum(s.get("duplicates_of", {}).get(VAL_TAG, 0) for s in added)
    dups = sum(s.get("duplicates", 0) for s in sources if s["tag"] != "parent") - val
    notes = []
    if dups:
        notes.append(f"{dups} image(s) of the new data are already in the parent's data (same content): merged once, "
                     f"their new labels used, not counted as new data")
    if val:
        notes.append(f"{val} training image(s) of the new data are copies of the parent's validation images: left out "
                     f"of training (the forgetting gate scores on those images)")
    return notes


def retrain(parent_dir: Path | str, adds: Sequence[Path | str], spec: LineSpec | None = None,
            run_dir: Path | str | None = None, cli: Layer | None = None, quiet: bool = False) -> RetrainResult:
    """Retrain ``parent_dir``'s model with the data folders ``adds`` (and ``spec``'s classes, if given).

    Settings: the given spec file's, else the parent's as recorded in its settings.yaml; ``cli`` (the command
    line's layer, retrain and train sections) on top, once."""
    from detect.checkpoints import list_checkpoints
    from detect.head_surgery import write_grown_weights
    from detect.retrain_lineage import build_lineage
    from detect.train import default_run_dir, train

    parent = load_parent(parent_dir)
    base = (spec if spec is not None else parent.spec).with_cli(cli)
    added = check_lineage(parent, base)
    run = RunPaths((Path(run_dir) if run_dir else default_run_dir(
        base, parent.run.root.parent.parent, datetime.now().strftime("retrain-%Y%m%d-%H%M%S"))).resolve())
    if run.metrics.exists() or list_checkpoints(run.checkpoints):
        raise ConfigError(f"run '{run.root}' already exists: continue it with `defectkit retrain --resume "
                          f"{run.root}` or choose another --name.")
    init = run.root / "init.pdparams"
    r = base.settings.retrain
    created = not run.root.exists()
    notes: list[str] = []
    try:  # a refusal while preparing leaves no half-made run behind
        merged = merge_data(parent, adds, base.classes, run.root / "data", r.replay, base.settings.train.seed,
                            base.settings.train.batch_size)
        policy = retrain_policy(base, parent, *merged.new_share, cli,
                                merged.train_images // base.settings.train.batch_size)
        rspec = retrain_spec(retrain_choices(base, policy, init, cli), merged)
        write_grown_weights(parent.weights, len(parent.spec.classes), len(rspec.classes), init)
        lineage = build_lineage(parent, merged, run.root)
        ewc = None
        if r.ewc > 0:
            from detect.ewc import ensure_fisher

            # frozen for the whole retrain: no Fisher needed for those tensors (thawed later: all of them)
            frozen = r.freeze if not base.settings.train.unfreeze_at_epoch else "none"
            fisher, note = ensure_fisher(parent, r.ewc_batches, quiet, frozen)
            ewc = {"fisher": str(fisher), "weight": r.ewc, "note": note}
            notes.append(f"EWC: {note}")
    except BaseException:
        if created:
            shutil.rmtree(run.root, ignore_errors=True)
        raise
    notes += duplicate_notes(merged.sources)
    record = {
        "status": "training",
        "parent": {"run": str(parent.run.root.resolve()), "classes": parent.spec.classes,
                   "weights": str(parent.weights.resolve())},
        "classes": rspec.classes, "new_classes": added, "data": merged.sources, "retrain": section_dict(r),
        "policy": policy,
        "teacher": {"weights": str(init), "old_classes": len(parent.spec.classes),
                    "parent_weights": str(parent.weights.resolve()), "distill": r.distill,
                    "distill_dfl": r.distill_dfl, "temperature": r.distill_temperature},
        "ewc": ewc, "lineage": lineage, "notes": notes,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(record_path(run), record)
    if not quiet:
        print(f"retrain: {policy['epochs']} epochs ({policy['why']}), lr {policy['lr']:g}; teacher distillation "
              f"{'on' if r.distill > 0 or r.distill_dfl > 0 else 'off'}, EWC {'on' if r.ewc > 0 else 'off'}")
        for note in notes:
            print(f"note: {note}")
    result = train(rspec, run.root, quiet=quiet)
    return finish_retrain(run, parent, rspec, result.metrics, quiet)


def resume_retrain(run_dir: Path | str, cli: Layer | None = None, quiet: bool = False) -> RetrainResult:
    """Continue an interrupted retrain exactly (``defectkit train --resume`` semantics), then judge it.

    ``retrain.epochs`` on the command line is the run's ``train.epochs`` (what a resume may extend)."""
    from detect.train import resume

    run = RunPaths(Path(run_dir).resolve())
    record = read_record(run.root)
    if record is None:
        raise ConfigError(f"'{run.root}' is not a retrain (no {RECORD}); resume a training run with "
                          f"`defectkit train --resume {run.root}`.")
    parent = load_parent(record["parent"]["run"])
    layer = {name: dict(values) for name, values in (cli or {}).items() if values}
    if "epochs" in layer.get("retrain", {}):
        layer.setdefault("train", {})["epochs"] = layer["retrain"].pop("epochs")
    layer = {name: values for name, values in layer.items() if values}
    if run.metrics.is_file() and not layer:  # training finished; the process died while judging
        import json

        metrics = json.loads(run.metrics.read_text())
    else:
        metrics = resume(run.root, layer, quiet=quiet).metrics
    spec = load_run_spec(run.root)
    record_policy_change(run, spec.settings.train.epochs)
    return finish_retrain(run, parent, spec, metrics, quiet)


def record_policy_change(run: RunPaths, epochs: int) -> None:
    """A resume that extended the run (``--epochs N``) changes the retrain's plan: retrain.json says so (the policy
    was written when the retrain started, and ``defectkit lineage`` and the bundle recipe read it)."""
    import json

    record = json.loads(record_path(run).read_text())
    policy = record.get("policy") or {}
    if policy.get("epochs") == epochs:
        return
    policy.setdefault("planned_epochs", policy.get("epochs"))
    policy.update(epochs=epochs, why=f"extended on resume to {epochs} (planned {policy['planned_epochs']}: "
                                     f"{policy.get('why_planned', policy.get('why'))})",
                  why_planned=policy.get("why_planned", policy.get("why")))
    record["policy"] = policy
    atomic_write_json(record_path(run), record)


PARENT_SCORE = "gate_parent.json"


def _eval_result(d: dict[str, Any]):
    """An EvalResult from its to_dict() form (None -> NaN, as metrics.json stores NaN)."""
    from detect.evaluate import EvalResult

    nan = lambda m: {k: float("nan") if v is None else v for k, v in (m or {}).items()}  # noqa: E731
    return EvalResult(d["map50_95"], d["map50"], nan(d.get("per_class")), nan(d.get("per_class_ap50")),
                      d.get("images", 0), d.get("detections", 0))


def parent_score(parent: Parent, out_dir: Path):
    """The parent's figures on its own val set, for the gate: evaluated once per (weights, val set, input size) and
    kept in the parent's run (``eval/gate_parent.json``); every later retrain of that parent reads them (the same
    deterministic evaluation of the same weights on the same images: a cache, not an approximation)."""
    import hashlib
    import json

    from detect.checkpoints import file_sha256
    from detect.infer import evaluate_weights

    key = hashlib.sha256(json.dumps([file_sha256(parent.weights), file_sha256(parent.spec.paths.val),
                                     parent.spec.image_size, parent.spec.model_size, list(parent.spec.classes)])
                         .encode()).hexdigest()
    cache = parent.run.eval_dir / PARENT_SCORE
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return _eval_result(stored["result"])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache: evaluate again
    result = evaluate_weights(parent.spec, parent.weights, parent.spec.paths.val, out_dir)
    try:
        atomic_write_json(cache, {"key": key, "weights": str(parent.weights), "val": str(parent.spec.paths.val),
                                  "result": asdict(result)})  # full precision (NaN as JSON's NaN)
    except OSError:  # a read-only parent run: evaluate each time
        pass
    return result


def old_class_score(run: RunPaths, spec: LineSpec, old_val: Path):
    """The retrained model on the parent's val set. Training's last step already ran the best weights over the
    merged val set (``eval/best/bbox.json``), whose first images are exactly the parent's: their detections are
    scored against ``val_old.json`` (ids matched by file name) instead of running the model over them again. Without
    that file (or if it is older than the best weights), the model is evaluated."""
    import json

    from detect.evaluate import coco_eval
    from detect.infer import evaluate_weights

    bbox = run.eval_dir / "best" / "bbox.json"
    if bbox.is_file() and bbox.stat().st_mtime >= run.best_weights.stat().st_mtime:
        merged = {im["id"]: im["file_name"] for im in json.loads(spec.paths.val.read_text())["images"]}
        own = {im["file_name"]: im["id"] for im in json.loads(old_val.read_text())["images"]}
        dets = [{**d, "image_id": own[merged[d["image_id"]]]} for d in json.loads(bbox.read_text())
                if merged.get(d["image_id"]) in own]
        return coco_eval(old_val, dets)
    return evaluate_weights(spec, run.best_weights, old_val, run.eval_dir / "old_classes")


def training_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the training of a retrain did, from its metrics.json (after any resume): epochs run, best, why it ended,
    and the epochs it was resumed after."""
    return {"epochs": metrics.get("epochs"), "epochs_run": metrics.get("epochs_run"),
            "best_epoch": metrics.get("best_epoch"), "stop_reason": metrics.get("stop_reason"),
            "train_minutes": metrics.get("train_minutes"),
            "resumed_after_epochs": [r.get("epoch") for r in metrics.get("resumes") or []]}


def finish_retrain(run: RunPaths, parent: Parent, spec: LineSpec, metrics: dict[str, Any],
                   quiet: bool = False) -> RetrainResult:
    """Score parent and retrained model on the parent's val set; write the verdict beside the run."""
    import json

    from detect.evaluate import EvalResult

    r = spec.settings.retrain
    before = parent_score(parent, run.eval_dir / "parent")
    # absolute: ppdet joins a relative annotation path onto the data set folder
    old_val = (run.root / "data" / "val_old.json").resolve()
    after = old_class_score(run, spec, old_val)
    merged_val = EvalResult(**{k: v for k, v in metrics["val"].items()}) if "val" in metrics else None
    if merged_val is not None:  # metrics.json holds None for NaN
        nan = lambda d: {k: float("nan") if v is None else v for k, v in d.items()}  # noqa: E731
        merged_val.per_class, merged_val.per_class_ap50 = nan(merged_val.per_class), nan(merged_val.per_class_ap50)
    verdict = judge(before, after, parent.spec.classes, merged_val, r.max_map_drop, r.max_class_drop,
                    r.min_new_class_ap50)
    record = json.loads(record_path(run).read_text())
    record.update(status="passed" if verdict.passed else "refused", forgetting=verdict.to_dict(),
                  training=training_summary(metrics),
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_json(record_path(run), record)
    title = f"{spec.line} — retrain {run.root.name} of {parent.run.root.name}"
    atomic_write_text(run.root / "retrain.md", markdown(verdict, title))
    plot(verdict, run.root / "retrain.png", title)
    if not quiet:
        print(verdict.line())
        print(f"figures: {run.root / 'retrain.md'}  plot: {run.root / 'retrain.png'}")
    return RetrainResult(run, metrics, verdict, record)
