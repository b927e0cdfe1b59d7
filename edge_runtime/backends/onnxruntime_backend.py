"""ONNX Runtime adapter: CPU execution provider, sequential execution, ``threads`` intra-op threads."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from edge_runtime.backends.base import Backend
from edge_runtime.errors import ModelError, require


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self) -> None:
        super().__init__()
        self._session = None
        self._path: Path | None = None

    def load(self, path: Path, threads: int) -> None:
        ort = require("onnxruntime", "edge", "The onnxruntime backend")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: warnings about unused initializers are noise on the box
        # ORT's worker threads spin after each run by default; on a 2-core box that steals the CPU the rest of the
        # frame (decode, host NMS, drift) needs: measured 36 -> 19 ms infer and 22 -> 12 ms NMS under load.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise ModelError(
                f"ONNX Runtime {ort.__version__} cannot load '{path}': {exc}. "
                "Check that the file is a complete .onnx export (opset <= what this ORT supports)."
            ) from exc
        self._path = Path(path)
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self._session is None:
            raise ModelError("onnxruntime backend: call load() before infer().")
        self.check_feeds(feeds)
        try:
            return list(self._session.run(self._outputs, {n: feeds[n] for n in self._inputs}))
        except Exception as exc:
            shapes = {n: tuple(feeds[n].shape) for n in self._inputs}
            raise ModelError(f"ONNX Runtime failed to run '{self._path}' on inputs {shapes}: {exc}") from exc

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__
