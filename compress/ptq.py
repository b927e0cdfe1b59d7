"""INT8 for Paddle Inference and Paddle Lite: PaddleSlim post-training quantization of the FP32 export.

``paddleslim.quant.quant_post_static`` calibrates activations on the line's training images (the edge runtime's
own pre-processing, so the scales see what the box will feed), quantizes weights per output channel and writes
QDQ ops (``onnx_format=True``: the form Paddle Lite 2.13rc0 converts). Traps handled here (STACK.md): it only
accepts a real ``paddle.io.DataLoader`` yielding dicts keyed by the program's feed names, it must run in static
mode (dygraph is restored afterwards), and it swallows its first error in a bare ``except`` — any failure comes
out as one ModelError naming the model. Paddle's KL calibration is pure Python (minutes per model); the same
algorithm vectorized with numpy (:func:`kl_threshold`, equal results) is swapped in for the call.

Which convs stay FP32 is *measured*, as for ONNX Runtime (compress/ort_quant.py): everything is quantized first;
if the INT8 detections on the calibration images leave the gate's golden tolerance (or flip a verdict, or lose
more than half the gate's mAP margin there), every conv is charged with the dB of signal-to-noise it loses
(:func:`conv_sensitivity`: SQNR of its output minus that of its input, FP32 vs INT8 program, static executor)
and the worst are skipped (``skip_tensor_list`` = their weight names), 1, 2, 4, 8 ... until it matches.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from compress.measure import calibration_annotations
from compress.variants import Variant
from detect.linespec import LineSpec
from edge_runtime.errors import DataError, ModelError, UserInputError
from edge_runtime.modelspec import ModelEntry, ModelSpec, file_sha256

log = logging.getLogger("defectkit.ptq")
ALGOS = ("KL", "hist", "mse", "avg")
CONV_OPS = ("conv2d", "depthwise_conv2d")
WEIGHT_QUANT = "channel_wise_abs_max"


def check_algo(algo: str) -> str:
    """The PaddleSlim spelling of ``algo`` (case-insensitive); anything else is refused with the list."""
    for a in ALGOS:
        if str(algo).lower() == a.lower():
            return a
    raise UserInputError(f"PTQ algorithm {algo!r} is not supported; choose one of {', '.join(ALGOS)} "
                         "(compress.ptq_algo in the line spec).")


# ------------------------------------------------------------------------------------------- calibration


def calibration_feeds(images: Sequence[Path], deploy: ModelSpec, feed_names: Sequence[str],
                      image_dir: Path | None = None, progress: bool = False) -> list[dict[str, np.ndarray]]:
    """One feed dict per image (batch dimension included) through the edge runtime's pre-processing."""
    import cv2

    from edge_runtime.preprocess import model_feeds

    where = image_dir or (Path(images[0]).parent if images else None)
    if not images:
        raise UserInputError(f"no calibration images in {where or 'the line image directory'}: PTQ needs the "
                             "line's training images (compress.calib_images >= 1, `defectkit data check`).")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise UserInputError(f"{len(missing)} calibration image(s) missing in {where}: {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''}. Restore them or fix the annotation file.")
    unknown = [n for n in feed_names if n not in ("image", "scale_factor")]
    if unknown:
        raise ModelError(f"the model asks for feeds {list(feed_names)}; the runtime provides image and "
                         "scale_factor only. Re-export it with `defectkit export`.")
    it: Any = images
    if progress:
        from tqdm import tqdm

        it = tqdm(images, desc="calibration images", unit="img", leave=False)
    out = []
    for path in it:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"calibration image {path} cannot be decoded; run `defectkit data check`.")
        out.append(model_feeds(img, deploy.input, feed_names))
    return out


def feed_names(model_file: Path) -> list[str]:
    """The program's feed names in feed-column order (read from the ProgramDesc, no executor needed)."""
    from detect.heavy import paddle_stack

    paddle_stack()
    from paddle.base.proto import framework_pb2

    prog = framework_pb2.ProgramDesc()
    try:
        prog.ParseFromString(Path(model_file).read_bytes())
    except Exception as exc:  # protobuf's DecodeError has no stable import path
        raise ModelError(f"{model_file} is not a Paddle ProgramDesc ({exc}); re-export with paddle 2.6") from None
    feeds = []
    for op in prog.blocks[0].ops:
        if op.type == "feed":
            col = next((a.i for a in op.attrs if a.name == "col"), len(feeds))
            feeds.append((col, op.outputs[0].arguments[0]))
    return [n for _, n in sorted(feeds)]


# ------------------------------------------------------------------------------------ fast KL threshold


def kl_threshold(hist: np.ndarray, bin_width: float, bits: int) -> float:
    """Paddle's ``cal_kl_threshold`` (TensorRT-style KL search over the activation histogram), vectorized per
    candidate: same candidates, same merge of bins into 2^(bits-1)-1 levels, same first-minimum rule."""
    hist = np.asarray(hist)
    n = hist.shape[0]
    levels = 2 ** (bits - 1) - 1
    start = int((n - 1) * 0.5)
    if start < levels:  # tiny histograms: too few bins to merge; paddle's own code handles them
        from paddle.static.quantization.cal_kl_threshold import cal_kl_threshold

        return cal_kl_threshold(hist, bin_width, bits)
    h = hist.astype(np.float64)
    total = float(h.sum())
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # tail[i] = sum(h[i:])
    best, best_i = math.inf, -1
    for i in range(start, n):
        if h[i - 1] == 0:
            continue
        p = h[:i].copy()
        p[-1] += tail[i]  # outliers clipped into the last bin
        bucket = np.minimum(np.arange(i) // (i // levels), levels - 1)
        merged = np.bincount(bucket, weights=h[:i], minlength=levels)
        nonzero = p != 0
        count = np.bincount(bucket, weights=nonzero, minlength=levels)
        avg = np.divide(merged, count, out=np.zeros(levels), where=count > 0)
        q = np.where(nonzero, avg[bucket], 0.0)
        pn, qn = p[nonzero], q[nonzero]
        kl = (np.sum(pn * np.log(q.sum() * pn)) - np.sum(pn * np.log(total * qn))) / total
        if best_i < 0 or kl < best:
            best, best_i = kl, i
    if best_i < 0:
        while start > 0 and hist[start] == 0:
            start -= 1
        best_i = start
    return (best_i + 0.5) * bin_width


@contextlib.contextmanager
def _fast_kl() -> Iterator[None]:
    import paddle.static.quantization.post_training_quantization as ptq_mod

    original = ptq_mod.cal_kl_threshold
    ptq_mod.cal_kl_threshold = kl_threshold
    try:
        yield
    finally:
        ptq_mod.cal_kl_threshold = original


# -------------------------------------------------------------------------------------------- quantize


def quantize(src_dir: Path, stem: str, dst_dir: Path, feeds: list[dict[str, np.ndarray]], algo: str,
             skip: Sequence[str] = (), progress: bool = True) -> Path:
    """One ``quant_post_static`` run: ``src_dir/<stem>.pdmodel`` -> ``dst_dir/<stem>.pdmodel`` (INT8 QDQ)."""
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    with contextlib.redirect_stdout(io.StringIO()):
        from paddleslim.quant import quant_post_static

    class _Calib(paddle.io.Dataset):
        def __len__(self) -> int:
            return len(feeds)

        def __getitem__(self, i: int) -> dict[str, np.ndarray]:
            return {k: v[0] for k, v in feeds[i].items()}  # the loader adds the batch dimension back

    src = Path(src_dir) / f"{stem}.pdmodel"
    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    quiet = contextlib.ExitStack()
    if not progress:  # paddleslim's own tqdm bars
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    try:
        with quiet, _fast_kl(), paddle.static.scope_guard(paddle.static.Scope()):
            loader = paddle.io.DataLoader(_Calib(), batch_size=1, shuffle=False, return_list=True)
            exe = paddle.static.Executor(paddle.CPUPlace())
            quant_post_static(
                exe, str(src_dir), str(dst_dir), data_loader=loader, model_filename=f"{stem}.pdmodel",
                params_filename=f"{stem}.pdiparams", save_model_filename=f"{stem}.pdmodel",
                save_params_filename=f"{stem}.pdiparams", batch_size=1, batch_nums=len(feeds), algo=algo,
                weight_quantize_type=WEIGHT_QUANT, onnx_format=True, skip_tensor_list=list(skip) or None)
    except Exception as exc:  # paddleslim retries its constructor in a bare except: report what came out
        raise ModelError(f"PaddleSlim quant_post_static failed on {src} (algo {algo}, {len(feeds)} calibration "
                         f"images): {type(exc).__name__}: {exc}") from exc
    finally:
        if was_dynamic:
            paddle.disable_static()
    out = Path(dst_dir) / f"{stem}.pdmodel"
    if not out.is_file() or not out.with_suffix(".pdiparams").is_file():
        raise ModelError(f"PaddleSlim wrote no {out} (+ .pdiparams) from {src}")
    return out


# ------------------------------------------------------------------------------------------ measurement


def _sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def conv_sensitivity(fp32_dir: Path, int8_dir: Path, stem: str, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """dB of SQNR each conv *loses* in the INT8 program (input SQNR minus output SQNR; higher = worse), keyed by
    the conv's weight name (what ``skip_tensor_list`` takes). Both programs run in paddle's static executor and
    every conv output is fetched; the graph input counts as clean (capped at 60 dB)."""
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        exe = paddle.static.Executor(paddle.CPUPlace())
        runs: list[tuple[Any, Any]] = []
        for d in (fp32_dir, int8_dir):
            scope = paddle.static.Scope()
            with paddle.static.scope_guard(scope):
                prog, _, _ = paddle.static.load_inference_model(str(Path(d) / stem), exe)
            runs.append((prog, scope))
        ops = [op for op in runs[0][0].global_block().ops]
        convs = {op.output("Output")[0]: op for op in ops if op.type in CONV_OPS}
        int8_vars = set(runs[1][0].global_block().vars)
        names = [n for n in convs if n in int8_vars]
        signal = dict.fromkeys(names, 0.0)
        noise = dict.fromkeys(names, 0.0)
        for feed in feeds:
            outs = []
            for prog, scope in runs:
                with paddle.static.scope_guard(scope):
                    outs.append(exe.run(prog, feed=feed, fetch_list=names, return_numpy=True))
            for n, a, b in zip(names, *outs):
                a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
                signal[n] += float(np.sum(a64 * a64))
                noise[n] += float(np.sum((a64 - b64) ** 2))
    finally:
        if was_dynamic:
            paddle.disable_static()
    snr = {n: _sqnr_db(signal[n], noise[n]) for n in names}
    producer = {o: op for op in ops for slot in op.output_names for o in op.output(slot)}

    def input_snr(var: str, depth: int = 0) -> float:
        """SQNR at ``var``: of the nearest conv upstream (through element-wise ops), inf at the graph input."""
        if var in snr:
            return snr[var]
        op = producer.get(var)
        if op is None or depth > 8 or op.type == "feed":
            return math.inf
        ups = [input_snr(i, depth + 1) for slot in op.input_names for i in op.input(slot) if i in producer]
        return min(ups) if ups else math.inf

    lost = {}
    for n in names:
        op = convs[n]
        before = min(input_snr(op.input("Input")[0]), 60.0)
        w = op.input("Filter")[0]  # a shared weight (the head's proj_conv) is charged with its worst use
        lost[w] = max(lost.get(w, -math.inf), round(before - min(snr[n], 60.0), 3))
    return lost


def quantization_summary(model_file: Path) -> dict[str, Any]:
    """What the INT8 program holds: QDQ op counts, quantized conv ops, FP32 conv weights, quantized weight tensors
    (a weight shared by several convs counts once) and how many of them are stored as int8."""
    from detect.heavy import paddle_stack

    paddle = paddle_stack().paddle
    model_file = Path(model_file)
    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        exe = paddle.static.Executor(paddle.CPUPlace())
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            prog, _, _ = paddle.static.load_inference_model(str(model_file.with_suffix("")), exe)
            block = prog.global_block()
            types = [op.type for op in block.ops]
            dequant_of = {op.output("Y")[0]: op.input("X")[0] for op in block.ops if op.type == "dequantize_linear"}
            filters = [op.input("Filter")[0] for op in block.ops if op.type in CONV_OPS]
            quantized = list(dict.fromkeys(dequant_of[f] for f in filters if f in dequant_of))
            fp32 = list(dict.fromkeys(f for f in filters if f not in dequant_of))
            int8 = [n for n in quantized if scope.find_var(n) is not None
                    and np.asarray(scope.find_var(n).get_tensor()).dtype == np.int8]
    finally:
        if was_dynamic:
            paddle.disable_static()
    return {"quantize_linear": types.count("quantize_linear"), "dequantize_linear": types.count("dequantize_linear"),
            "convs_int8": sum(f in dequant_of for f in filters), "convs_fp32": fp32, "quantized_weights": len(quantized),
            "int8_weights": len(int8)}


def _write_deploy(out_dir: Path, stem: str, parent: ModelSpec, parent_entry: ModelEntry, meta: dict) -> Path:
    from detect.export import paddle_version

    model = out_dir / f"{stem}.pdmodel"
    entry = ModelEntry(file=model.name, format="paddle", target="any", precision="int8", nms=parent_entry.nms,
                       runtime_version=paddle_version(), sha256=file_sha256(model))
    parent.variant([entry], meta).save(out_dir)
    return model


def _check_round(reference: list, model: Path, images: Sequence[Path], spec: LineSpec, ann: Path | None,
                 fp32_map: float | None) -> dict[str, Any]:
    """How far the INT8 candidate is from FP32 on the calibration images (gate tolerance, verdicts, mAP)."""
    import cv2

    from compress.gate import gate_settings
    from compress.measure import evaluate_model
    from edge_runtime.decision import decide
    from edge_runtime.predict import Detector
    from edge_runtime.selftest import compare

    _, tol, cfg = gate_settings(spec)
    det = Detector.from_model(model, backend="paddle")  # also proves paddle.inference loads the INT8 program
    off = flips = 0
    for path, ref in zip(images, reference):
        got = det(cv2.imread(str(path), cv2.IMREAD_COLOR))
        off += bool(compare(ref, got, tol))
        flips += decide(ref, det.classes, cfg).is_ng != decide(got, det.classes, cfg).is_ng
    drop = None
    if ann is not None and fp32_map is not None:
        drop = round((fp32_map - evaluate_model(model, spec, ann, backend="paddle", progress=False).map50_95) * 100, 3)
    return {"images_off": off, "verdict_flips": flips, "calib_map_drop_pts": drop}


def ptq_paddle(spec: LineSpec, parent_export: Path, out_dir: Path, calib_images: list[Path], *, algo: str = "KL",
               source: str = "model_nonms", progress: bool = True, max_skipped: int = 4) -> Variant:
    """Write ``out_dir/<source>.pdmodel/.pdiparams`` (PaddleSlim INT8, QDQ, per-channel weights) and its
    deploy.json; return the ``ptq-int8`` variant. Sensitive convs are kept FP32 by measurement (module doc):
    rounds keep 0, 1, 2, 4 .. ``max_skipped`` convs FP32, the best round is the result."""
    import cv2

    from compress.gate import gate_settings
    from compress.measure import evaluate_model
    from edge_runtime.predict import Detector

    algo = check_algo(algo)
    parent_export, out_dir = Path(parent_export), Path(out_dir)
    src = parent_export / f"{source}.pdmodel"
    if not src.is_file() or not src.with_suffix(".pdiparams").is_file():
        raise UserInputError(f"{src} (+ .pdiparams) does not exist: export the run first "
                             "(`defectkit export --run RUN`), or pass source= the stem of a paddle model in it.")
    if out_dir.resolve() == parent_export.resolve():
        raise UserInputError(f"ptq_paddle: output {out_dir} is the parent export; pick the variant's own directory.")
    deploy = ModelSpec.load(parent_export / "deploy.json")
    parent_entry = deploy.find(src.name)
    feeds = calibration_feeds(calib_images, deploy, feed_names(src), spec.paths.images, progress)
    max_drop, _, _ = gate_settings(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference_det = Detector.from_model(src, backend="paddle")
    reference = [reference_det(cv2.imread(str(p), cv2.IMREAD_COLOR)) for p in calib_images]
    ann = calibration_annotations(spec, calib_images, out_dir / ".calibration.json")
    fp32_map = evaluate_model(src, spec, ann, backend="paddle", progress=False).map50_95 if ann else None
    from importlib.metadata import version

    meta = {"parent": str(src), "quantizer": f"paddleslim {version('paddleslim')} quant_post_static"}
    rounds: list[dict[str, Any]] = []
    lost: dict[str, float] = {}
    best: tuple[tuple[int, float], list[str]] | None = None
    keep = Path(tempfile.mkdtemp(prefix=".ptq-best-", dir=out_dir))
    try:
        k = 0
        while True:
            skipped = sorted(lost, key=lost.get, reverse=True)[:k] if k else []  # type: ignore[arg-type]
            quantize(parent_export, source, out_dir, feeds, algo, skipped, progress)
            model = _write_deploy(out_dir, source, deploy, parent_entry, meta)
            check = _check_round(reference, model, calib_images, spec, ann, fp32_map)
            rounds.append({"skipped": len(skipped), **check})
            drop = check["calib_map_drop_pts"] or 0.0
            log.info("ptq-int8 (%s): %d conv(s) FP32 -> %d/%d calibration images off, %d verdict flips, "
                     "mAP drop %s pt",
                     algo, len(skipped), check["images_off"], len(feeds), check["verdict_flips"],
                     check["calib_map_drop_pts"])
            score = (check["images_off"] + check["verdict_flips"], max(drop, 0.0))
            if best is None or score < best[0]:
                best = (score, skipped)
                for suffix in (".pdmodel", ".pdiparams"):  # kept aside: no re-run if a later round is worse
                    shutil.copyfile(model.with_suffix(suffix), keep / f"{source}{suffix}")
            if (score[0] == 0 and drop <= max_drop / 2) or k >= max_skipped:
                break
            if not lost:
                lost = conv_sensitivity(parent_export, out_dir, source, feeds)
            k = 1 if k == 0 else k * 2
        skipped = best[1] if best else []
        if rounds[-1]["skipped"] != len(skipped):  # an earlier round was the best: put it back
            for suffix in (".pdmodel", ".pdiparams"):
                shutil.copyfile(keep / f"{source}{suffix}", out_dir / f"{source}{suffix}")
            _write_deploy(out_dir, source, deploy, parent_entry, meta)
    finally:
        shutil.rmtree(keep, ignore_errors=True)
    summary = quantization_summary(out_dir / f"{source}.pdmodel")
    if summary["convs_int8"] == 0:
        raise ModelError(f"{out_dir / src.name}: PaddleSlim quantized no conv (all {len(skipped)} skipped?)")
    recipe = {
        "tool": meta["quantizer"], "algo": algo, "format": "QDQ (onnx_format=True)", "weights": WEIGHT_QUANT,
        "activations": "per-tensor", "calibration_images": len(feeds), "source": src.name,
        "calibration_files": [Path(p).name for p in calib_images],
        "sensitivity": "dB of SQNR lost per conv (FP32 vs INT8 program, calibration images)",
        "skipped": [{"weight": w, "db_lost": lost.get(w)} for w in skipped], "rounds": rounds,
        "most_sensitive": [{"weight": w, "db_lost": v} for w, v in sorted(lost.items(), key=lambda x: -x[1])[:8]],
        "program": summary,
    }
    return Variant(name="ptq-int8", method="ptq", parent="fp32", export_dir=out_dir.resolve(), recipe=recipe)


__all__ = ["ptq_paddle", "quantize", "conv_sensitivity", "quantization_summary", "kl_threshold", "check_algo",
           "calibration_feeds", "feed_names", "ALGOS"]
