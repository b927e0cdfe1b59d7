"""Helpers for the fleet tests (no tests here): real signed bundle archives made cheaply, a real collector.

A bundle is built with the edge runtime's own manifest and signature code (``edge_runtime.bundle``) around a
placeholder model file: the registry verifies signatures and checksums, it never runs the model, so a real
network is not needed to test it. Keys come from ``compress.keys.init_keys`` (the ``defectkit keys init`` format).
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import tarfile
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlsplit

from compress.keys import init_keys, load_private_key
from edge_runtime.bundle import (MANIFEST, SIGNATURE, FileRef, GoldenImage, Manifest, ModelEntry, signature_document)
from edge_runtime.modelspec import InputSpec, PostprocessSpec


def keys(base: Path, name: str = "bundle"):
    """(private key object, private PEM path, public PEM path)."""
    pair = init_keys(base / f"keys-{name}")
    return load_private_key(pair.private), pair.private, pair.public


def _put(root: Path, rel: str, data: bytes) -> str:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def make_archive(base: Path, private_key, *, line: str = "line-a", version: str = "1.0.0",
                 parent: Optional[str] = None, metrics: Optional[dict] = None, recipe: Optional[dict] = None,
                 models: Sequence[tuple] = (("onnx", "any"),), sign: bool = True, tamper: bool = False) -> Path:
    """``base/<line>-<version>.tar.gz``: a signed bundle (``sign=False``: no manifest.sig; ``tamper``: a model
    file changed after signing)."""
    root = base / f"stage-{line}-{version}-{os.urandom(4).hex()}"
    entries = []
    for i, (fmt, target) in enumerate(models):
        rel = f"models/m{i}.{'onnx' if fmt == 'onnx' else 'nb'}"
        sha = _put(root, rel, f"model {line} {version} {i}".encode() * 64)
        entries.append(ModelEntry(file=rel, format=fmt, target=target, precision="fp32",
                                  runtime_version="2.13rc0" if fmt == "paddlelite" else None, sha256=sha, nms="host"))
    g = GoldenImage(file="golden/00.png", sha256=_put(root, "golden/00.png", b"\x89PNG golden"),
                    expected=FileRef("golden/00.png.expected.json", _put(root, "golden/00.png.expected.json", b"{}")))
    drift = FileRef("drift_reference.json", _put(root, "drift_reference.json", b'{"features": {}}'))
    kw = dict(line=line, version=version, parent_version=parent, created="2026-11-22T10:00:00Z",
              classes=("short", "open"), input=InputSpec(size=(64, 64)), postprocess=PostprocessSpec(),
              models=tuple(entries), metrics=dict(metrics if metrics is not None else {"map50": 0.9, "gate_passed": 1.0}),
              recipe=dict(recipe if recipe is not None else {"run": f"runs/{line}-{version}"}), golden=(g,),
              drift_reference=drift)
    names = {f.name for f in dataclasses.fields(Manifest)}
    if "settings" in names:  # manifest /2 carries the box settings
        from edge_runtime.settings import BoxSettings

        kw["settings"] = BoxSettings()
    manifest = Manifest(**kw)
    body = manifest.to_bytes()
    Manifest.from_dict(json.loads(body))
    (root / MANIFEST).write_bytes(body)
    if sign:
        (root / SIGNATURE).write_bytes(signature_document(body, private_key.sign(body), private_key.public_key()))
    if tamper:
        (root / entries[0].file).write_bytes(b"tampered model")
    out = base / f"{line}-{version}{'-unsigned' if not sign else ''}{'-tampered' if tamper else ''}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for p in sorted(root.rglob("*")):
            tar.add(str(p), arcname=p.relative_to(root).as_posix(), recursive=False)
    return out


def call(url: str, method: str, path: str, body=None, token: Optional[str] = None, headers=None, context=None):
    """(status, parsed JSON or raw bytes or None, response) of one real HTTP(S) request."""
    u = urlsplit(url)
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=20, context=context)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        ctype = r.getheader("content-type") or ""
        parsed = json.loads(data) if data and "json" in ctype else (data or None)
        return r.status, parsed, r
    finally:
        conn.close()


def report(device: str, line: str, version: str, *, frames: int = 40, ng: int = 2, drift: str = "none",
           health_extra: Optional[dict] = None) -> dict:
    """A valid defectkit.report dict with the given counts (built by the box's own ReportBuilder)."""
    from edge_runtime.report_builder import ReportBuilder

    b = ReportBuilder(device_id=device, line=line, bundle_version=version)
    for i in range(frames):
        b.record_frame(ng=i < ng, classes=["short"] if i < ng else [], latency_ms=10)
    feats = {"brightness": {"state": drift, "psi": 0.1, "ks_p": 0.5}}
    return b.build(drift=feats, health_extra=health_extra).to_dict()
