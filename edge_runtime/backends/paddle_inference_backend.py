"""paddle.inference adapter, for boxes (and test rigs) that happen to have paddlepaddle installed.

``path`` is the ``model.pdmodel``; its parameters are the ``.pdiparams`` with the same stem.
paddle is imported inside :meth:`load` only, after zlib (see STACK.md: the import-order segfault).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from edge_runtime.backends.base import Backend
from edge_runtime.errors import ModelError


class PaddleInferenceBackend(Backend):
    name = "paddle"

    def __init__(self) -> None:
        super().__init__()
        self._predictor = None
        self._path: Path | None = None

    def load(self, path: Path, threads: int) -> None:
        import zlib  # noqa: F401  -- before paddle, always

        from edge_runtime.errors import require

        inference = require("paddle.inference", "train", "The paddle backend")
        path = Path(path)
        params = path.with_suffix(".pdiparams")
        if path.suffix != ".pdmodel" or not params.is_file():
            raise ModelError(
                f"the paddle backend needs 'model.pdmodel' with 'model.pdiparams' beside it; got '{path}' "
                f"({'no ' + params.name if not params.is_file() else 'wrong suffix'})."
            )
        config = inference.Config(str(path), str(params))
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(int(threads))
        config.switch_ir_optim(True)
        config.enable_memory_optim()
        config.disable_glog_info()
        try:
            self._predictor = inference.create_predictor(config)
        except Exception as exc:
            raise ModelError(f"paddle.inference cannot load '{path}': {exc}") from exc
        self._path = path
        self._inputs = list(self._predictor.get_input_names())
        self._outputs = list(self._predictor.get_output_names())

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self._predictor is None:
            raise ModelError("paddle backend: call load() before infer().")
        self.check_feeds(feeds)
        try:
            for name in self._inputs:
                handle = self._predictor.get_input_handle(name)
                array = np.ascontiguousarray(feeds[name])
                handle.reshape(list(array.shape))
                handle.copy_from_cpu(array)
            self._predictor.run()
            return [self._predictor.get_output_handle(n).copy_to_cpu() for n in self._outputs]
        except Exception as exc:
            shapes = {n: tuple(feeds[n].shape) for n in self._inputs}
            raise ModelError(f"paddle.inference failed to run '{self._path}' on inputs {shapes}: {exc}") from exc

    def version(self) -> str:
        import paddle

        return paddle.__version__
