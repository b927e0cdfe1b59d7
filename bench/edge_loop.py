"""The edge box's inspection loop under load: per-frame time split per backend, sustained frames/s, memory.

Runs the real loop (``edge_runtime.run.Inspector``: the code behind ``python -m edge_runtime run``) on a real
signed bundle for ``--seconds`` per backend, over a camera-like stream: an MJPEG video of held-back synthetic
boards, rewound at its end so the stream never ends. Reports go to a real collector (``fleet.collector
serve``, a separate process) every ``--report-interval`` seconds; the metrics server is on; NG images, JSON
lines and the CSV summary are written as on a box.

    python bench/edge_loop.py [--seconds 120] [--backend onnxruntime|paddle|paddlelite ...] [--quick] [--no-box]
    python bench/edge_loop.py render [bench/results/edge_loop.json]   # docs section from saved results

The bundle is built here once (cached in ``--work``): the kit's base detector (PP-YOLOE+ tiny, 320 px,
``base_weights/pcb-base-tiny-320.pdparams``, no training) exported for a synthetic demo line (paddle + ONNX
host-NMS, and a Paddle Lite x86 ``.nb`` converted in the edge box), a drift reference built on the line's
training images with the runtime's own statistics, golden images, signed with a fresh key. ONNX Runtime and
Paddle Inference run on this host (Python 3.11); ONNX Runtime and Paddle Lite run in the edge box
(``scripts/edge_box.sh``, Python 3.9), where the ``measure`` step of this script imports only edge_runtime.

Per frame: decode, pre, infer, post, drift (features + monitor), report (report counters, hard examples,
alarm reports), output (JSON line, NG image, CSV summary, metrics); ``periodic`` is the loop's periodic work
(reports built and spooled, metrics refreshed, update inbox polled), amortised per frame. The issue's bar:
drift + report + periodic <= 3 % of the per-frame wall time, same run. Results: ``bench/results/edge_loop.json``
(``edge_loop_quick.json`` with --quick) and the "## Edge loop" section of docs/benchmarks.md (full runs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("decode", "pre", "infer", "post", "decide", "drift", "drift_input", "report", "output")
LINE = "pcb-bench"
DEVICE = "bench-box-01"
BASE_WEIGHTS = ROOT / "base_weights" / "pcb-base-tiny-320.pdparams"
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
WARMUP_FRAMES = 10  # left out of the stage means and the frame rate (first inferences allocate)
INFER_SECONDS = 12.0  # each inference-only phase (5: before, between and after 4 loop segments)
TARGETS = (("host", "onnxruntime"), ("host", "paddle"), ("box", "onnxruntime"), ("box", "paddlelite"))


# ---------------------------------------------------------------------------------------- measuring (box-safe)


def rss_mb() -> float:
    """Resident memory of this process (MB), from /proc (the box has no psutil)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


ROLES = {"defectkit-inference": "inference", "MainThread": "loop", "defectkit-reader": "reader",
         "defectkit-writer": "writer"}  # Python thread name -> role; other Python threads: "service"


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of every thread of this process so far, summed by role: the pipeline's
    threads by name, other Python threads (metrics server, uplink, update channel) as "service", threads Python
    did not start (ONNX Runtime's intra-op pool, codec threads) as "native". From /proc (the box has no psutil)."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # the thread ended between listdir and read
            continue
        fields = stat.rsplit(")", 1)[1].split()
        name = names.get(int(tid))
        role = "native" if name is None else ROLES.get(name, "service")
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


class InferTimer:
    """Wraps ``Detector.infer`` (the call both sides make): wall time and the calling thread's CPU time per call,
    summed per mode ("loop" or "alone"). At 1 intra-op thread the model runs in the calling thread, so wall - CPU
    is time the call spent off the CPU: preempted, or waiting for the GIL after ONNX Runtime released it."""

    def __init__(self, detector: Any) -> None:
        self.inner = detector.infer
        self.mode = "loop"
        self.sums = {"loop": [0, 0.0, 0.0], "alone": [0, 0.0, 0.0]}  # calls, wall s, thread CPU s
        detector.infer = self

    def __call__(self, feeds: Any) -> Any:
        w0, c0 = time.perf_counter(), time.thread_time()
        out = self.inner(feeds)
        s = self.sums[self.mode]
        s[0] += 1
        s[1] += time.perf_counter() - w0
        s[2] += time.thread_time() - c0
        return out

    def result(self) -> dict[str, dict[str, float]]:
        return {m: {"calls": n, "wall_ms": round(w * 1e3 / max(n, 1), 3), "thread_cpu_ms": round(c * 1e3 / max(n, 1), 3)}
                for m, (n, w, c) in self.sums.items()}


class LoopingCapture:
    """cv2.VideoCapture of a video file that rewinds at its end: a camera stream that never ends, decoded
    frame by frame as the real VideoSource decodes it (passed as the loop's ``capture_factory``)."""

    def __init__(self, path: str, *args: Any) -> None:
        import cv2

        self._cv2 = cv2
        self._path = path
        self._cap = cv2.VideoCapture(path)
        self.rewinds = 0

    def isOpened(self) -> bool:  # noqa: N802 (cv2's name)
        return self._cap.isOpened()

    def read(self):
        ok, image = self._cap.read()
        if not ok:
            self._cap.release()
            self._cap = self._cv2.VideoCapture(self._path)
            self.rewinds += 1
            ok, image = self._cap.read()
        return ok, image

    def release(self) -> None:
        self._cap.release()


class Recorder:
    """A frame hook of the Inspector: times the loop in segments interleaved with inference-only phases.

    After ``WARMUP_FRAMES`` frames it runs the model alone (``Detector.infer`` back to back on pre-processed
    frames of the same video, the same detector and thread count) for ``infer_s`` seconds, then lets the loop
    run for ``seconds / segments``, then the model alone again, and so on: ``segments`` loop segments between
    ``segments + 1`` inference-only phases, so both see the same load from other work on shared cores. While
    the hook runs a phase the loop waits (the reader's bounded queue fills): phases are outside loop time.
    """

    def __init__(self, inspector: Any, seconds: float, infer_s: float, feeds_of: Any, segments: int = 4,
                 sample_s: float = 10.0) -> None:
        self.inspector, self.seconds, self.infer_s, self.sample_s = inspector, seconds, infer_s, sample_s
        self.segments = max(1, segments)
        self.feeds_of = feeds_of  # detector -> list of prepared feeds
        self.stages: dict[str, float] = {k: 0.0 for k in STAGES}  # running sums: no per-frame storage that
        self.n = 0  # would itself grow the RSS this bench watches (~320 bytes a frame with lists)
        self.loop_s = 0.0  # loop time over finished segments
        self.seg_start: Optional[float] = None
        self.seg_frames: list[int] = []
        self.loop_frames = 0
        self.done = False
        self.rss: list[tuple[float, float]] = []
        self.backlog: list[int] = []  # the writer's backlog at each RSS sample
        self._next_sample = 0.0
        self.infer_only: list[dict] = []
        self.periodic_in_loop = 0.0
        self._periodic_at_seg = 0.0
        self.cpu_loop: dict[str, float] = {}  # CPU seconds by thread role over the loop segments
        self.cpu_alone: dict[str, float] = {}  # ... over the inference-only phases
        self.calls_alone = 0
        self._cpu_at_seg: dict[str, float] = {}
        self.timer: Optional[InferTimer] = None

    def _infer_only(self) -> None:
        det = self.inspector.model.detector
        feeds = self.feeds_of(det)
        for f in feeds[:3]:  # warm-up, not timed
            self.timer.inner(f)
        self.timer.mode = "alone"
        n, cpu0, t0 = 0, thread_cpu_s(), time.perf_counter()
        while True:
            det.infer(feeds[n % len(feeds)])
            n += 1
            el = time.perf_counter() - t0
            if el >= self.infer_s:
                break
        delta = _cpu_delta(cpu0, thread_cpu_s())
        delta["inference"] = delta.get("inference", 0.0) + delta.pop("loop", 0.0)  # this thread called the model
        self._add(self.cpu_alone, delta)
        self.calls_alone += n
        self.timer.mode = "loop"
        self.infer_only.append({"calls": n, "seconds": round(el, 2), "fps": round(n / el, 3)})

    @staticmethod
    def _add(total: dict[str, float], delta: dict[str, float]) -> None:
        for k, v in delta.items():
            total[k] = total.get(k, 0.0) + v

    def _begin_segment(self) -> None:
        if self.timer is None:
            self.timer = InferTimer(self.inspector.model.detector)
        self._infer_only()
        self._periodic_at_seg = self.inspector.periodic_ms
        self._cpu_at_seg = thread_cpu_s()
        self.seg_frames.append(0)
        self.seg_start = time.perf_counter()

    def __call__(self, stages: dict[str, float]) -> None:
        self.n += 1
        if self.done:
            return
        if self.n == WARMUP_FRAMES:
            self._begin_segment()
            return
        if self.seg_start is None:
            return
        now = time.perf_counter()
        self.loop_frames += 1
        self.seg_frames[-1] += 1
        for k in STAGES:
            self.stages[k] += float(stages.get(k, 0.0))
        elapsed = self.loop_s + now - self.seg_start
        if now >= self._next_sample:
            self.rss.append((round(elapsed, 1), round(rss_mb(), 1)))
            self.backlog.append(self.inspector.writer.backlog)  # records waiting for the writer (bounded)
            self._next_sample = now + self.sample_s
        if now - self.seg_start >= self.seconds / self.segments:
            self.loop_s += now - self.seg_start
            self.periodic_in_loop += self.inspector.periodic_ms - self._periodic_at_seg
            self._add(self.cpu_loop, _cpu_delta(self._cpu_at_seg, thread_cpu_s()))
            if len(self.seg_frames) >= self.segments:
                self.rss.append((round(self.loop_s, 1), round(rss_mb(), 1)))
                self._infer_only()
                self.done = True
                self.inspector.stop()
            else:
                self._begin_segment()

    def result(self) -> dict[str, Any]:
        n = self.loop_frames
        if n < 2 or not self.done:
            raise RuntimeError(f"only {n} loop frames measured: too few")
        wall_ms = self.loop_s * 1e3 / n
        means = {k: v / n for k, v in self.stages.items()}
        periodic = self.periodic_in_loop / n
        loop_thread = means["drift"] - means["drift_input"] + means["report"] + periodic
        with_reader = loop_thread + means["drift_input"]
        infer_fps = sum(r["fps"] for r in self.infer_only) / len(self.infer_only)
        fps = 1e3 / wall_ms
        rss = [v for _t, v in self.rss]
        return {
            "loop_frames": n, "loop_seconds": round(self.loop_s, 1), "fps": round(fps, 3),
            "segment_frames": self.seg_frames, "infer_only": self.infer_only, "infer_only_fps": round(infer_fps, 3),
            "loop_vs_infer_only_pct": round(100 * fps / infer_fps, 1), "wall_ms_per_frame": round(wall_ms, 3),
            "stage_ms": {**{k: round(v, 3) for k, v in means.items()}, "periodic": round(periodic, 3)},
            "drift_report_loop_ms": round(loop_thread, 3), "drift_report_pct": round(100 * loop_thread / wall_ms, 2),
            "drift_report_with_reader_pct": round(100 * with_reader / wall_ms, 2),
            "rss_mb_samples": self.rss, "rss_mb_spread": round(max(rss) - min(rss), 1),
            "writer_backlog_samples": self.backlog,
            "cpu_ms_per_frame": {k: round(v * 1e3 / n, 3) for k, v in sorted(self.cpu_loop.items())},
            "cpu_ms_per_call_alone": {k: round(v * 1e3 / max(self.calls_alone, 1), 3)
                                      for k, v in sorted(self.cpu_alone.items())},
            "infer_call": self.timer.result() if self.timer else {},
        }


def _video_feeds(video: str, count: int = 16):
    """The first ``count`` frames of the stream, pre-processed by a detector (for the inference-only phases)."""
    import cv2

    cap = cv2.VideoCapture(video)
    images = []
    while len(images) < count:
        ok, im = cap.read()
        if not ok:
            break
        images.append(im)
    cap.release()
    cache: dict[int, list] = {}

    def feeds_of(det: Any) -> list:
        if id(det) not in cache:
            cache[id(det)] = [det.prepare(im) for im in images]
        return cache[id(det)]

    return feeds_of


def measure(args: argparse.Namespace) -> int:
    """One backend, one process: the Inspector on the bundle over the looping video; JSON to --out-json."""
    import logging

    from edge_runtime.run import Inspector
    from edge_runtime.runconfig import RunOptions, read_token

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rss_before = rss_mb()
    cpu0, wall0 = os.times(), time.perf_counter()
    opts = RunOptions(
        bundle=Path(args.bundle), public_key=Path(args.public_key), source=str(args.video), device_id=DEVICE,
        out_dir=Path(args.run_dir), collector=args.collector,
        token=read_token(Path(args.token_file)) if args.token_file else None, backend=args.backend,
        threads=args.threads, metrics_port=0, capture_factory=LoopingCapture,
        overrides={"report": {"interval_s": args.report_interval}}, uplink_interval_s=1.0,
    )
    inspector = Inspector(opts)
    rec = Recorder(inspector, args.seconds, args.infer_seconds, _video_feeds(str(args.video)))
    inspector.frame_hooks.append(rec)
    summary = inspector.run()
    cpu1, wall1 = os.times(), time.perf_counter()
    out = rec.result()
    import cv2
    import numpy as np

    out.update({
        "backend": summary.backend, "bundle_version": summary.bundle_version, "threads": args.threads,
        "python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
        "runtime_version": _runtime_version(summary.backend), "min_score": inspector.min_score,
        "rss_mb": {"before_load": round(rss_before, 1), "start": rec.rss[0][1], "end": rec.rss[-1][1],
                   "peak": round(peak_rss_mb(), 1)},
        "cpu_util": round((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (wall1 - wall0), 2),
        "frames": summary.frames, "ok": summary.ok, "ng": summary.ng, "skipped": summary.errors,
        "reports_spooled": summary.reports,
        "reports_sent": inspector.uplink.state.sent_total if inspector.uplink else 0,
        "ng_images_written": inspector.outputs.ng_images, "ng_images_dropped": inspector.writer.images_dropped,
        "drift_state": inspector.monitor.state if inspector.monitor else None,
        "report_interval_s": args.report_interval, "stopped_by": summary.stopped_by,
    })
    Path(args.out_json).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("backend", "fps", "infer_only_fps", "loop_vs_infer_only_pct",
                                          "drift_report_pct")}))
    return 0


def _runtime_version(backend: str) -> str:
    try:
        if backend == "onnxruntime":
            import onnxruntime

            return f"onnxruntime {onnxruntime.__version__}"
        if backend == "paddlelite":
            from importlib.metadata import version

            return f"paddlelite {version('paddlelite')}"
        if backend == "paddle":
            import paddle  # already imported by the backend

            return f"paddle {paddle.__version__}"
    except Exception as exc:  # a version string is not worth failing a 2-minute run for
        return f"{backend} (version unknown: {exc})"
    return backend


# ---------------------------------------------------------------------------------------- the kit (host only)


@dataclass
class Kit:
    bundle: str
    public_key: str
    video: str
    tokens: str
    token_file: str
    models: list
    frames_in_video: int


def build_kit(work: Path, lite: bool) -> Kit:
    """Bundle, key, stream video and collector tokens in ``work`` (reused when already there)."""
    kit_json = work / "kit.json"
    if kit_json.is_file():
        kit = Kit(**json.loads(kit_json.read_text()))
        if Path(kit.bundle).exists() and (not lite or "paddlelite" in kit.models):
            print(f"kit reused from {work} (bundle {kit.bundle})", flush=True)
            return kit
        raise SystemExit(f"{work} holds a kit without what this run needs: remove it or pass another --work")
    import zlib  # noqa: F401  -- before paddle (import-order segfault, STACK.md)

    os.environ.setdefault("ENABLE_FALL_BACK", "False")  # paddle 2.6 export needs it (STACK.md)
    import secrets
    import shutil

    import cv2

    from compress.bundle import ModelFile, build_bundle
    from compress.bundle_from_run import box_settings, drift_reference
    from compress.keys import PRIVATE_NAME, PUBLIC_NAME, init_keys, load_private_key
    from detect.data.synth import generate_line
    from detect.export import export
    from edge_runtime.modelspec import ModelSpec
    from edge_runtime.predict import Detector
    from edge_runtime.selftest import expected_record

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("building the bench kit: synthetic line, export of the base detector, drift reference, bundle", flush=True)
    spec = generate_line(work / "line", line=LINE, count=64, seed=21, val_fraction=0.25, progress=False)
    spec = replace(spec, model_size="tiny", image_size=320)  # the base weights' model
    spec.save(spec.source)
    settings = box_settings(spec, str(spec.source))  # the line's runtime/drift/report, shipped in the manifest
    stream = generate_line(work / "stream", line="stream", count=120, seed=4021, val_fraction=0.5, progress=False)
    exp = work / "export"
    export(spec, BASE_WEIGHTS, exp, formats=["paddle_nonms", "onnx_nonms"], meta={"note": "bench: base weights"})
    deploy = ModelSpec.load(exp / "deploy.json")
    onnx = exp / "model_nonms.onnx"
    models = [ModelFile(onnx, "onnx", "any", "fp32", "host", None)]
    if lite:
        from compress.lite_convert import opt_in_edgebox, rewrite_for_lite

        plain = work / "lite_src"
        plain.mkdir(exist_ok=True)
        for suffix in (".pdmodel", ".pdiparams"):
            shutil.copyfile(exp / f"model_nonms{suffix}", plain / f"model{suffix}")
        rewrite_for_lite(plain, work / "lite_rewritten")
        nb = opt_in_edgebox(work / "lite_rewritten", exp / "model_nonms_x86", "x86")
        models.append(ModelFile(nb.path, "paddlelite", "x86", "fp32", "host", nb.version))
    models.append(ModelFile(exp / "model_nonms.pdmodel", "paddle", "any", "fp32", "host", None,
                            params=exp / "model_nonms.pdiparams"))
    ref = drift_reference(spec, onnx, work / "drift_reference.json", progress=False, runtime=settings.runtime)
    det = Detector.from_model(onnx, backend="onnxruntime", threads=2)
    val = json.loads(spec.paths.val.read_text())["images"][:3]
    golden = []
    for im in val:
        path = spec.paths.images / im["file_name"]
        golden.append((path, expected_record(det(cv2.imread(str(path))), det.classes)))
    if not (work / "keys" / PRIVATE_NAME).is_file():
        init_keys(work / "keys")
    bundle_dir = build_bundle(work / "store", LINE, "1.0.0", None, models, deploy.input, deploy.postprocess,
                              deploy.classes, {}, {"method": "none", "note": "base weights, not trained; bench"},
                              golden, ref, load_private_key(work / "keys" / PRIVATE_NAME), settings=settings)
    video, n = _write_video(sorted((stream.paths.images).glob("*.jpg")), work / "stream.avi")
    token = secrets.token_urlsafe(24)
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps({"admin": secrets.token_urlsafe(24), "devices": {DEVICE: token}}))
    (work / "device.token").write_text(token + "\n")
    kit = Kit(str(bundle_dir.parent / f"{bundle_dir.name}.tar.gz"), str(work / "keys" / PUBLIC_NAME), str(video),
              str(tokens), str(work / "device.token"), [m.format for m in models], n)
    kit_json.write_text(json.dumps(asdict(kit), indent=1))
    print(f"kit built in {time.time() - t0:.0f} s: {kit.bundle}", flush=True)
    return kit


def _write_video(images: list[Path], out: Path) -> tuple[Path, int]:
    """An MJPEG .avi of the boards (each frame a JPEG, as industrial USB/GigE cameras deliver them)."""
    import cv2

    first = cv2.imread(str(images[0]))
    h, w = first.shape[:2]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an MJPEG video at {out}")
    for p in images:
        writer.write(cv2.resize(cv2.imread(str(p)), (w, h)))
    writer.release()
    return out, len(images)


# ---------------------------------------------------------------------------------------- orchestration


class Collector:
    """``python -m fleet.collector serve`` in its own process (the central side, not part of the box)."""

    def __init__(self, work: Path, tokens: str) -> None:
        self.log = open(work / "collector.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "fleet.collector", "serve", "--db", str(work / "collector.db"),
                                      "--port", "0", "--tokens", tokens], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            text = (work / "collector.log").read_text()
            if "collector listening on " in text:
                self.url = text.split("collector listening on ", 1)[1].split()[0]
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the collector exited:\n{text}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the collector did not start in 30 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run_target(where: str, backend: str, kit: Kit, work: Path, args: argparse.Namespace, url: str,
               threads: int) -> dict:
    tag = f"{where}-{backend}-t{threads}"
    run_dir, out_json = work / "runs" / tag, work / "runs" / f"{tag}.json"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = ["measure", "--bundle", kit.bundle, "--public-key", kit.public_key, "--video", kit.video,
           "--backend", backend, "--seconds", str(args.seconds), "--threads", str(threads),
           "--run-dir", str(run_dir), "--out-json", str(out_json), "--collector", url,
           "--token-file", kit.token_file, "--report-interval", str(args.report_interval),
           "--infer-seconds", str(args.infer_seconds)]
    print(f"== {tag}: {args.seconds:.0f} s", flush=True)
    load0 = os.getloadavg()
    timeout = args.seconds + 5 * args.infer_seconds + 300
    if where == "host":
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *cmd], capture_output=True, text=True,
                              timeout=timeout)
    else:
        from compress.lite_convert import edgebox_run

        proc = edgebox_run(["python", "/opt/defectkit/bench/edge_loop.py", *cmd], [work], timeout=timeout, check=False)
    if proc.returncode != 0 or not out_json.is_file():
        raise RuntimeError(f"{tag} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(out_json.read_text())
    res.update({"where": where, "loadavg_before_after": [round(load0[0], 2), round(os.getloadavg()[0], 2)]})
    print(f"   loop {res['fps']} frames/s = {res['loop_vs_infer_only_pct']} % of inference-only {res['infer_only_fps']}; "
          f"drift+report {res['drift_report_pct']} % (with the reader's {res['drift_report_with_reader_pct']} %), "
          f"RSS {res['rss_mb']['start']} -> {res['rss_mb']['end']} MB", flush=True)
    return res


def markdown(results: list[dict], meta: dict) -> str:
    """The "## Edge loop" section of docs/benchmarks.md."""
    cols = ("decode", "pre", "infer", "post", "decide", "drift", "drift_input", "report", "periodic", "output")
    loads = [x for r in results for x in r["loadavg_before_after"]]
    lines = [
        "## Edge loop", "",
        "The edge box's real inspection loop (`edge_runtime.run.Inspector`, the code of `python -m edge_runtime run`)",
        "on a signed bundle of the kit's base detector (PP-YOLOE+ tiny, 320 px, FP32, host NMS; not fine-tuned), fed",
        "by an MJPEG stream of 320 x 320 synthetic boards (rewound at its end), reporting to a real collector process",
        f"every {meta['report_interval_s']:g} s, metrics server on, NG images and JSON lines written;"
        f" inference threads as in each row. The loop is pipelined (`edge_runtime/pipeline.py`): a reader thread"
        " decodes, pre-processes and computes the image drift features of frame n+1 while an inference thread runs"
        " the model on frame n, the loop thread post-processes, decides, updates drift and reports for frame n-1,"
        " and a writer thread writes the JSON lines, NG images and CSV rows of the frames before. Post-processing"
        " drops candidates below min(lowest decision threshold, hard-example band low) before the NMS (floor 0.3"
        " with this line's settings; the serial loop's NMS ran on every candidate above 0.01).",
        "What the two sides measure. **Loop**: frames inspected per second of loop time (4 segments, wall clock),"
        " everything above included (decode, pre-processing, drift, post-processing, decisions, reports, JSON lines,"
        " NG images). **Inference-only**: in the same process, on the same `Detector` object (the same ONNX Runtime"
        " session: same intra-op thread count, same session options, spinning off on both sides), `Detector.infer`"
        " called back to back in one thread on 16 frames of the same video pre-processed by the same"
        " `Detector.prepare` beforehand (so neither decoding nor pre-processing is in its time), for"
        f" {meta.get('infer_seconds', 12):g} s before, between and after the 4 loop segments ({meta['seconds']:g} s of"
        " loop in all); its figure is the phases' mean. While it runs the pipeline's threads wait on their full"
        " queues (the CPU they still use is in the table below, under `alone`); the collector process gets no"
        " reports then. Both sides go through the same timing wrapper around `Detector.infer`.",
        f"Command: `{meta['command']}`. Measured {meta['date']} on {meta['machine']} ({meta.get('cpu_flags', '')}),"
        f" cores shared with other engineers' work (1-min load average {min(loads):.1f}-{max(loads):.1f} at the"
        " runs' start and end).", "",
        "| where | backend | threads | loop frames/s | inference-only frames/s | loop / inference-only | "
        "drift+report (loop thread) | incl. reader's drift features | RSS start → end, spread (peak) MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['where']} (Py {r['python']}) | {r['runtime_version']} | {r['threads']} | {r['fps']:.2f} | "
                     f"{r['infer_only_fps']:.2f} ({', '.join(str(x['fps']) for x in r['infer_only'])}) | "
                     f"**{r['loop_vs_infer_only_pct']:.1f} %** | **{r['drift_report_pct']:.2f} %** | "
                     f"{r['drift_report_with_reader_pct']:.2f} % | {r['rss_mb']['start']:.0f} → {r['rss_mb']['end']:.0f},"
                     f" {r['rss_mb_spread']:.1f} ({r['rss_mb']['peak']:.0f}) |")
    lines += ["", "Per-frame stage means (ms; `drift` includes `drift_input`, the image features computed in the reader"
              " thread; `output` = the loop thread's hand-over to the writer; `periodic` = reports built and spooled,"
              " metrics, update inbox, amortised per frame):", "",
              "| backend | threads | " + " | ".join(cols) + " | wall ms/frame |", "|---|---|" + "---|" * (len(cols) + 1)]
    for r in results:
        st = r["stage_ms"]
        lines.append(f"| {r['backend']} | {r['threads']} | " + " | ".join(f"{st[c]:.2f}" for c in cols) + f" | {r['wall_ms_per_frame']:.1f} |")
    roles = ("inference", "native", "reader", "loop", "writer", "service")
    lines += ["", "CPU time by thread (ms per frame in the loop, per call alone; from /proc, user + system): `inference`"
              " = the thread calling the model (ONNX Runtime computes in it; alone, the loop thread calls it), `native` = threads Python did not start"
              " (ONNX Runtime's intra-op pool at 2 threads), `reader` = decode + pre-processing + image drift features,"
              " `loop` = post-processing, decisions, drift, reports, metrics, `writer` = JSON lines, drawing and JPEG"
              " encoding of NG images, atomic writes, `service` = metrics server, uplink. `infer call` = wall and"
              " calling-thread CPU of one `Detector.infer` (at 1 thread, wall - CPU is time off the CPU: preempted"
              " by other work, or waiting for the GIL once ONNX Runtime hands back); `frame wall` = loop time per frame,"
              " or 1 / the inference-only rate, and in brackets what is left after the infer call: the inference"
              " thread waiting for a prepared frame or for room downstream, and the hand-offs between threads:", "",
              "| threads | side | " + " | ".join(roles) + " | all but inference+native | infer call wall / CPU ms |"
              " frame wall ms (gap) |",
              "|---|---|" + "---|" * (len(roles) + 3)]
    for r in results:
        if "cpu_ms_per_frame" not in r:
            continue
        for side, key, call in (("loop", "cpu_ms_per_frame", "loop"), ("alone", "cpu_ms_per_call_alone", "alone")):
            cpu = r[key]
            rest = sum(v for k, v in cpu.items() if k not in ("inference", "native"))
            ic = r["infer_call"].get(call, {})
            frame = r["wall_ms_per_frame"] if side == "loop" else 1e3 / r["infer_only_fps"]
            gap = frame - ic.get("wall_ms", 0.0)  # loop: the inference thread outside the model (hand-off, starved)
            lines.append(f"| {r['threads']} | {side} | " + " | ".join(f"{cpu.get(k, 0.0):.2f}" for k in roles)
                         + f" | {rest:.2f} | {ic.get('wall_ms', 0):.2f} / {ic.get('thread_cpu_ms', 0):.2f} |"
                         f" {frame:.2f}" + (f" ({gap:+.2f})" if side == "loop" else "") + " |")
    worst_ratio = min(r["loop_vs_infer_only_pct"] for r in results)
    worst = max(r["drift_report_pct"] for r in results)
    lines += ["", "Runs: " + ", ".join(
                  f"{r['where']}/{r['backend']}/{r['threads']} thread(s) {r['loop_frames']} loop frames in {r['loop_seconds']:.0f} s"
                  f" ({r['ok']} OK, {r['ng']} NG, {r['ng_images_written']} NG images written,"
                  f" {r['ng_images_dropped']} dropped; {r['reports_spooled']} reports spooled, {r['reports_sent']} sent;"
                  f" decision floor {r['min_score']}; RSS samples {r['rss_mb_samples']})" for r in results) + ".",
              f"Bars: loop ≥ 90 % of inference-only: worst {worst_ratio:.1f} % — "
              + ("**met**" if worst_ratio >= 90.0 else "**not met**")
              + f"; drift + reporting ≤ 3 % of frame time (loop thread): worst {worst:.2f} % — "
              + ("**met**" if worst <= 3.0 else "**not met**") + ". The reader thread's image drift features cost CPU"
              " beside inference (they are in the throughput ratio) but not loop-thread time; with inference in its own"
              " thread the loop thread's work overlaps the next inference, so this share is CPU per frame rather than"
              " time added to a frame.",
              "RSS is sampled every 10 s of loop time over each run's loop window (minutes, not the bar's 10 minutes);"
              " the first samples include allocator warm-up. Every queue of the pipeline is bounded (read-ahead 2,"
              " inference 2, NG images waiting for the disk 8; JSON lines 10000), so memory cannot grow with a fast"
              " camera or a slow disk: `tests/test_edge_pipeline.py` checks both.",
              f"Raw figures: `{meta['results']}`."]
    missing = [f"{w}/{b}" for w, b in TARGETS if not any(r["where"] == w and r["backend"] == b for r in results)]
    if missing:
        lines.append("Not re-run with the pipelined loop: " + ", ".join(missing) + " (their serial-loop figures of"
                     " 2026-11-22 are in this file's git history).")
    return "\n".join(lines + [""])


def write_docs_section(text: str) -> None:
    """Replace only the "## Edge loop" section (other engineers own the other sections)."""
    from edge_runtime.fileio import atomic_write_text

    doc = DOCS.read_text()
    start = doc.find("\n## Edge loop\n")
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        nxt = doc.find("\n## ", start + 1)
        doc = doc[:start + 1] + text.rstrip("\n") + "\n" + ("" if nxt < 0 else doc[nxt:])
    atomic_write_text(DOCS, doc)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def _cpu_flags() -> str:
    flags: set = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512_vnni"))


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["measure"]:
        return measure(_measure_parser().parse_args(argv[1:]))
    if argv[:1] == ["render"]:  # the docs section again from saved results (no new measurement)
        saved = json.loads(Path(argv[1] if len(argv) > 1 else RESULTS / "edge_loop.json").read_text())
        write_docs_section(markdown(saved["runs"], saved["meta"]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="seconds per backend run (default 120)")
    ap.add_argument("--backend", action="append", choices=("onnxruntime", "paddle", "paddlelite"),
                    help="only these backends (repeatable; default: all four runs)")
    ap.add_argument("--quick", action="store_true", help="20 s per run, results to edge_loop_quick.json, docs untouched")
    ap.add_argument("--no-box", action="store_true", help="host runs only (no edge box, no Paddle Lite)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2],
                    help="inference threads; several values = one run each (default 2)")
    ap.add_argument("--infer-seconds", type=float, default=INFER_SECONDS,
                    help="seconds of each inference-only phase, interleaved with 4 loop segments (default 12)")
    ap.add_argument("--report-interval", type=float, default=5.0, help="seconds between reports (default 5)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/defectkit-bench-edge-loop"), help="kit and run folders")
    ap.add_argument("--results-name", default=None,
                    help="write bench/results/<name>.json and leave docs/benchmarks.md alone (e.g. a 10-minute RSS run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 20.0)
    targets = [(w, b) for w, b in TARGETS if (not args.backend or b in args.backend) and not (args.no_box and w == "box")]
    if not targets:
        ap.error("no run left: --no-box leaves no Paddle Lite run")
    kit = build_kit(args.work, lite=any(b == "paddlelite" for _, b in targets))
    collector = Collector(args.work, kit.tokens)
    results = []
    try:
        for threads in args.threads:
            for where, backend in targets:
                results.append(run_target(where, backend, kit, args.work, args, collector.url, threads))
    finally:
        collector.stop()
    name = f"{args.results_name}.json" if args.results_name else "edge_loop_quick.json" if args.quick else "edge_loop.json"
    meta = {"command": ("python bench/edge_loop.py " + " ".join(argv)).strip(), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_model()}",
            "cpu_flags": _cpu_flags(), "infer_seconds": args.infer_seconds,
            "report_interval_s": args.report_interval, "threads": args.threads, "seconds": args.seconds,
            "bundle_models": kit.models, "video_frames": kit.frames_in_video, "results": f"bench/results/{name}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from edge_runtime.fileio import atomic_write_text

    atomic_write_text(RESULTS / name, json.dumps({"meta": meta, "runs": results}, indent=1))
    section = markdown(results, meta)
    print("\n" + section)
    if not args.quick and not args.results_name:
        write_docs_section(section)
    return 0


def _measure_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge_loop.py measure", description="one backend run (imports edge_runtime only)")
    for name in ("--bundle", "--public-key", "--video", "--run-dir", "--out-json"):
        ap.add_argument(name, required=True)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--collector", default=None)
    ap.add_argument("--token-file", default=None)
    ap.add_argument("--report-interval", type=float, default=5.0)
    ap.add_argument("--infer-seconds", type=float, default=INFER_SECONDS)
    return ap


if __name__ == "__main__":
    raise SystemExit(main())
