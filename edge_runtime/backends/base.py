"""The adapter interface every inference backend implements (the shape of OpenVINO model_api adapters).

The :class:`edge_runtime.predict.Detector` owns pre- and post-processing; a backend only loads one model
file and maps named input arrays to output arrays. A new runtime is one small file plus one line in
:data:`edge_runtime.backends.BACKENDS`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Mapping

import numpy as np

from edge_runtime.errors import ModelError


class Backend(ABC):
    """Load a model file, then run it: ``infer({name: array}) -> [outputs in output_names order]``."""

    name: ClassVar[str] = "?"
    # whether load()'s ``threads`` changes anything (Paddle Lite's x86 wheels have no thread setting): the box times
    # thread counts only where it does (edge_runtime.variant_load)
    threads_settable: bool = True
    # set by load(): the model's feed names (model order) and output names (the order infer returns)
    _inputs: list[str]
    _outputs: list[str]

    def __init__(self) -> None:
        self._inputs, self._outputs = [], []

    @abstractmethod
    def load(self, path: Path, threads: int) -> None:
        """Load ``path`` for CPU inference with ``threads`` intra-op threads; ModelError if it cannot."""

    @property
    def input_names(self) -> list[str]:
        """The model's feed names, in the model's order."""
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        """The model's output names, in the order :meth:`infer` returns them."""
        return list(self._outputs)

    @abstractmethod
    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference; ``feeds`` must hold every name of :attr:`input_names`."""

    def version(self) -> str:
        """Version of the runtime library (for reports)."""
        return "unknown"

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Refuse feeds that do not match the model's inputs, naming both sides."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ModelError(
                f"{self.name}: the model expects inputs {self.input_names}, got {sorted(feeds)}; "
                f"missing {missing}. Check 'input.feeds' in deploy.json."
            )
