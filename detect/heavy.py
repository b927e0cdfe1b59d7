"""The one module that imports the heavy training stack, in the only order that is safe.

Importing ``paddle`` before ``zlib`` (directly, or through numpy/cv2) and then ``ppdet``, ``lap``,
``pyclipper`` or ``pycocotools.coco`` segfaults in zlib's ``inflateReset2`` (STACK.md). Every entry
point that needs paddle calls :func:`paddle_stack` instead of importing paddle itself.
"""
from __future__ import annotations

import os
import types
import zlib  # noqa: F401  -- must be loaded before paddle: see the module docstring

import numpy  # noqa: F401
import cv2  # noqa: F401

# Paddle 2.6 exports fail under the default SOT mode ("Can't call main_program when full_graph=False").
os.environ.setdefault("ENABLE_FALL_BACK", "False")
# ppdet prints a numba/motmetrics warning per import; keep the training log readable.
os.environ.setdefault("FLAGS_call_stack_level", "0")
# paddle's C++ glog INFO lines ("New Executor is Running") drown the progress output
os.environ.setdefault("GLOG_minloglevel", "2")

_STACK: types.SimpleNamespace | None = None


def paddle_stack() -> types.SimpleNamespace:
    """Import paddle and ppdet once, in a safe order, and return them as ``.paddle`` and ``.ppdet``."""
    global _STACK
    if _STACK is None:
        import contextlib
        import io
        import logging

        from edge_runtime.errors import require

        paddle = require("paddle", "train", "Training and export")
        with contextlib.redirect_stdout(io.StringIO()):  # ppdet prints optional-dependency warnings
            ppdet = require("ppdet", "train", "Training and export")
            import ppdet.engine  # noqa: F401
            import ppdet.modeling  # noqa: F401

            import detect.assigner  # noqa: F401  -- registers the kit's assigner with ppdet's workspace
        logging.getLogger("ppdet").setLevel(logging.WARNING)
        _STACK = types.SimpleNamespace(paddle=paddle, ppdet=ppdet)
    return _STACK
