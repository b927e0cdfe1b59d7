"""Build and sign a bundle: one immutable directory and ``.tar.gz`` per line and version.

Layout of ``<out_root>/<line>/<version>/``::

    manifest.json  manifest.sig  drift_reference.json
    models/<model files>         golden/<NN>-<image>, golden/<NN>-<image>.expected.json

The manifest carries the line's ``runtime``, ``drift`` and ``report`` settings (:class:`BoxSettings`): what the box
decides, monitors and reports with. A drift reference that records the runtime settings it was built with
(``meta.runtime``, written by :func:`compress.bundle_from_run.drift_reference`) must match them.

The builder stages everything in a hidden directory beside the target, signs the manifest, verifies the result
with :func:`edge_runtime.bundle.verify_bundle` (the same code the edge box runs), makes files read-only and only
then renames it into place; the archive is written to a temporary name and hard-linked to its final name, so a
reader never sees half a bundle and an existing version is never overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from edge_runtime.bundle import (
    MANIFEST,
    NAME_RE,
    SIGNATURE,
    FileRef,
    GoldenImage,
    Manifest,
    ModelEntry,
    sha256_file,
    signature_document,
    verify_bundle,
)
from edge_runtime.errors import BundleError, UserInputError
from edge_runtime.modelspec import InputSpec, ModelSpec, PostprocessSpec
from edge_runtime.settings import BoxSettings

Expected = Union[str, Path, Mapping[str, Any], Sequence[Any]]


@dataclass(frozen=True)
class ModelFile:
    """A model file to ship and what it is (``params`` is a paddle model's ``.pdiparams``)."""

    path: Path
    format: str
    target: str
    precision: str
    nms: str
    runtime_version: str | None = None
    params: Path | None = None
    name: str | None = None  # file name inside the bundle (default: the source's); a paddle model's params get
    #                          the same prefix, so two variants' model_nonms.onnx can ship side by side
    variant: str | None = None  # the gated variant it belongs to (fp32, ort-int8, ...): the box times the variants
    #                             of its backend and runs the fastest that passes its self-test


def models_from_deploy(deploy: str | Path) -> tuple[ModelSpec, list[ModelFile]]:
    """The model files an export's ``deploy.json`` lists, checked against their sha256 there."""
    spec = ModelSpec.load(deploy)
    directory = ModelSpec.path_of(deploy).parent
    files = []
    for entry in spec.models:
        path = spec.verify(directory, entry)
        params = path.with_suffix(".pdiparams") if entry.format == "paddle" else None
        if params is not None and not params.is_file():
            raise UserInputError(f"{path}: the paddle model's weights {params.name} are missing beside it")
        files.append(ModelFile(path=path, format=entry.format, target=entry.target, precision=entry.precision,
                               nms=entry.nms, runtime_version=entry.runtime_version, params=params))
    return spec, files


def _kit_version() -> str:
    try:
        from importlib.metadata import version

        return version("defectkit")
    except Exception:  # running from a checkout
        return "0+checkout"


def _copy(src: Path, root: Path, rel: str) -> FileRef:
    if not src.is_file():
        raise UserInputError(f"bundle input {src} does not exist or is not a file")
    dst = root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return FileRef(file=rel, sha256=sha256_file(dst))


def _write(root: Path, rel: str, data: bytes) -> FileRef:
    dst = root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    return FileRef(file=rel, sha256=sha256_file(dst))


def _expected_bytes(expected: Expected) -> bytes:
    if isinstance(expected, (str, Path)):
        path = Path(expected)
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserInputError(f"golden expected output {path} is not a readable JSON file ({exc})") from None
        return path.read_bytes()
    return (json.dumps(expected, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _make_read_only(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            os.chmod(Path(dirpath) / name, 0o444)
        os.chmod(dirpath, 0o555)


def _write_tar(src: Path, dst_tmp: Path, mtime: float) -> None:
    """A reproducible gzip tar of ``src`` with members relative to it (manifest.json at the top)."""
    with open(dst_tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            info = tar.gettarinfo(str(path), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = mtime
            if path.is_file():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
        raw.flush()
        os.fsync(raw.fileno())


def build_bundle(
    out_root: str | Path,
    line: str,
    version: str,
    parent_version: str | None,
    model_files: Sequence[ModelFile],
    input_spec: InputSpec,
    postprocess: PostprocessSpec,
    classes: Sequence[str],
    metrics: Mapping[str, float],
    recipe: Mapping[str, Any],
    golden: Sequence[tuple[str | Path, Expected]],
    drift_reference_path: str | Path,
    private_key,
    created: datetime | None = None,
    *,
    settings: BoxSettings,
    golden_tolerance: Mapping[str, float] | None = None,
) -> Path:
    """Write ``out_root/<line>/<version>/`` and ``<version>.tar.gz``, signed with ``private_key``; return the dir.

    ``settings``: the line's runtime / drift / report sections the box will run on (from the run's spec:
    ``BoxSettings.from_sections(spec.settings.box_sections(), ...)``)."""
    if not isinstance(settings, BoxSettings):
        raise UserInputError(f"bundle settings must be a BoxSettings (runtime, drift, report), got {type(settings).__name__}")
    for what, value in (("line", line), ("version", version)):
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise UserInputError(f"bundle {what} {value!r} must match {NAME_RE.pattern} (letters, digits, . _ -)")
    if not model_files:
        raise UserInputError("a bundle needs at least one model file")
    if not classes:
        raise UserInputError("a bundle needs the class names (in contract order)")
    line_dir = Path(out_root) / line
    final, archive = line_dir / version, line_dir / f"{version}.tar.gz"
    for p in (final, archive):
        if p.exists():
            raise UserInputError(f"bundle {line} {version} already exists at {p}: bundles are immutable, pick a new version")
    created = created or datetime.now(timezone.utc)
    line_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=line_dir))
    tar_tmp = line_dir / f".{version}.tar.gz.{os.getpid()}.tmp"
    try:
        models = []
        seen: set[str] = set()
        for m in model_files:
            name = m.name or Path(m.path).name
            if name in seen:
                raise UserInputError(f"two model files are named {name}: rename one (bundle files share models/)")
            seen.add(name)
            ref = _copy(Path(m.path), stage, f"models/{name}")
            params_name = Path(m.params).name if m.params else ""
            if m.params and m.name:
                params_name = Path(m.name).stem + Path(m.params).suffix
            params = _copy(Path(m.params), stage, f"models/{params_name}") if m.params else None
            models.append(ModelEntry(file=ref.file, format=m.format, target=m.target, precision=m.precision,
                                     runtime_version=m.runtime_version, sha256=ref.sha256, nms=m.nms, params=params,
                                     variant=m.variant))
        goldens = []
        for i, (image, expected) in enumerate(golden):
            image = Path(image)
            img = _copy(image, stage, f"golden/{i:02d}-{image.name}")
            exp = _write(stage, f"golden/{i:02d}-{image.name}.expected.json", _expected_bytes(expected))
            goldens.append(GoldenImage(file=img.file, sha256=img.sha256, expected=exp))
        check_reference_settings(Path(drift_reference_path), settings)
        drift = _copy(Path(drift_reference_path), stage, "drift_reference.json")
        manifest = Manifest(
            line=line, version=version, parent_version=parent_version,
            created=created.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            kit_version=_kit_version(), classes=tuple(classes), input=input_spec, postprocess=postprocess,
            models=tuple(models), metrics={k: float(v) for k, v in metrics.items()}, recipe=dict(recipe),
            golden=tuple(goldens), drift_reference=drift, settings=settings,
            golden_tolerance=dict(golden_tolerance) if golden_tolerance is not None else None,
        )
        body = manifest.to_bytes()
        Manifest.from_dict(json.loads(body))  # never sign what the edge box would refuse to read
        (stage / MANIFEST).write_bytes(body)
        (stage / SIGNATURE).write_bytes(signature_document(body, private_key.sign(body), private_key.public_key()))
        verify_bundle(stage, private_key.public_key())
        _make_read_only(stage)
        _write_tar(stage, tar_tmp, created.timestamp())
        try:
            os.rename(stage, final)  # fails if another build took the version meanwhile (non-empty dir)
        except OSError as exc:
            raise UserInputError(f"bundle {line} {version} appeared at {final} during the build: {exc}") from None
        try:
            os.link(tar_tmp, archive)
        except FileExistsError:
            raise UserInputError(f"{archive} appeared during the build: bundles are immutable") from None
        os.chmod(archive, 0o444)
        return final
    except BundleError as exc:  # the builder's own self-check failed: a bug, not user input
        raise BundleError(f"the bundle just built does not verify: {exc}") from exc
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        if tar_tmp.exists():
            tar_tmp.unlink()


def check_reference_settings(path: Path, settings: BoxSettings) -> None:
    """A drift reference that names the runtime settings it was built with must have been built with the ones
    the bundle ships (otherwise the box would compare its decisions with another threshold's statistics)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8")).get("meta", {})
    except (OSError, ValueError, AttributeError):
        return  # unreadable or not an object: the file is copied as given and the box's loader judges it
    built_with = meta.get("runtime") if isinstance(meta, dict) else None
    if built_with is not None and built_with != settings.runtime.to_dict():
        raise UserInputError(f"drift reference {path} was built with runtime settings {built_with}, but the bundle "
                             f"ships {settings.runtime.to_dict()}: rebuild the reference with the bundle's settings.")


def box_settings_from_json(path: str | Path) -> BoxSettings:
    """Settings for ``bundle build --settings-json``: a JSON object with any of runtime, drift, report over the
    table's defaults (keys and types checked, unknown ones refused)."""
    return BoxSettings.from_sections(read_json(path, "settings"), f"settings file {path}")


def read_json(path: str | Path, what: str) -> Any:
    """A JSON input of the CLI (metrics, recipe), with a message naming the file on failure."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserInputError(f"{what} file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UserInputError(f"{what} file {path} is not valid JSON: {exc}") from None


__all__ = ["ModelFile", "build_bundle", "models_from_deploy", "read_json", "box_settings_from_json",
           "check_reference_settings"]
