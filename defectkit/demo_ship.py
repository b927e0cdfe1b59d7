"""The demo's second half: compress behind the gate, ship a signed bundle, run the edge box against a local
collector. Each stage calls the same function as its CLI verb (``compress``, ``keys init``, ``bundle RUN``,
``python -m edge_runtime run``, ``collector serve``)."""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

DEVICE = "demo-box-01"


@dataclass
class ShipResult:
    table_md: Path
    variants: list[dict[str, Any]]
    shipped: list[str]  # the variants in the bundle: FP32 and every gate-passed ONNX Runtime INT8 variant
    bundle: Path
    public_key: Path
    messages: list[str] = field(default_factory=list)


def compress_and_bundle(out: Path, run_dir: Path, lite: bool = False,
                        overrides: Optional[dict[str, Any]] = None) -> ShipResult:
    """PTQ (ONNX Runtime INT8 recipes + PaddleSlim INT8), gate, table; bundle FP32 and every gate-passed ONNX
    Runtime variant, as `defectkit bundle RUN` does without --variant: the box times them and runs the fastest."""
    from compress.bundle_from_run import bundle_from_run, default_variants
    from compress.keys import PRIVATE_NAME, PUBLIC_NAME, init_keys
    from compress.pipeline import compress_layer, compress_run, load_run
    from compress.variants import list_variants

    spec = load_run(run_dir)[0].with_cli(compress_layer({"compress": overrides or {}}))  # as `compress --set`
    result = compress_run(run_dir, "ptq", spec, lite=lite)
    for msg in result.messages:
        print(msg)
    variants = {v.name: v for v in list_variants(run_dir)}
    shipped, _left_out = default_variants(run_dir)
    keys = out / "keys"
    if not (keys / PRIVATE_NAME).is_file():
        init_keys(keys)
    store = out / "bundles"
    bundle = bundle_from_run(run_dir, None, store, keys / PRIVATE_NAME)
    summary = [{"name": v.name, "map50_95": v.map50_95, "map50": v.map50, "size_mb": v.size_mb,
                "latency_ms": v.latency_ms, "gate": None if v.gate is None else v.gate["passed"],
                "reasons": [] if v.gate is None else v.gate["reasons"]} for v in variants.values()]
    return ShipResult(result.table.markdown, summary, shipped, bundle, keys / PUBLIC_NAME, result.messages)


def edge_run(out: Path, bundle: Path, public_key: Path, images: Path) -> dict[str, Any]:
    """``edge_runtime run`` on the held-back boards, reporting to a collector this process starts itself; the box
    runs on the line's settings from the bundle manifest."""
    from edge_runtime.run import EFFECTIVE_SETTINGS, Inspector
    from edge_runtime.runconfig import RunOptions
    from fleet.collector import CollectorThread
    from fleet.settings import CollectorSettings

    edge = out / "edge"
    edge.mkdir(parents=True, exist_ok=True)
    admin, token = secrets.token_hex(16), secrets.token_hex(16)
    tokens = edge / "collector_tokens.json"
    tokens.write_text(json.dumps({"admin": admin, "devices": {DEVICE: token}}))
    collector = CollectorThread(CollectorSettings(db=edge / "collector.db", port=0, tokens_file=tokens)).start()
    try:
        options = RunOptions(bundle=bundle, public_key=public_key, source=str(images), device_id=DEVICE,
                             out_dir=edge / "box", collector=collector.url, token=token, metrics_port=-1,
                             uplink_interval_s=0.5)
        inspector = Inspector(options)
        summary = inspector.run()
        reports = _collector_reports(collector.url, admin)
    finally:
        collector.stop()
    predictions = sorted((edge / "box" / "predictions").glob("*.jsonl"))
    shown = json.loads((options.state_dir / EFFECTIVE_SETTINGS).read_text())
    choice = shown.get("variant") or {}  # what the box timed on this CPU and ran (None: a one-variant bundle)
    return {"summary": summary.line(), "backend": summary.backend, "bundle_version": summary.bundle_version,
            "frames": summary.frames, "ng": summary.ng, "ok": summary.ok, "errors": summary.errors,
            "predictions": [str(p) for p in predictions], "collector_reports": reports["count"],
            "collector_frames": sum(r["counts"]["frames"] for r in reports["reports"]),
            "variant": choice.get("variant", "fp32"), "variant_reason": choice.get("reason", "the only variant"),
            "variant_medians_ms": choice.get("medians_ms", {})}


def _collector_reports(url: str, admin: str) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(f"{url}/api/v1/reports?device={DEVICE}&limit=1000",
                                 headers={"Authorization": f"Bearer {admin}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


__all__ = ["ShipResult", "compress_and_bundle", "edge_run"]
