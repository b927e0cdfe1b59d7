"""Named points inside an install, for the crash tests: trace them, or stop the process at one of them.

``DEFECTKIT_CRASHPOINT_TRACE=FILE`` appends each point's name to FILE (one a line) as it is reached.
``DEFECTKIT_CRASHPOINT_PAUSE=NAME`` (with the trace set) makes the thread that reaches NAME write
``FILE.paused`` (the name) and block for ever: the test then ``kill -9``s the process exactly there.
Both are read at every call, so the cost without them is one dictionary lookup; nothing else uses them.
"""
from __future__ import annotations

import os
import threading

TRACE_ENV = "DEFECTKIT_CRASHPOINT_TRACE"
PAUSE_ENV = "DEFECTKIT_CRASHPOINT_PAUSE"


def crashpoint(name: str) -> None:
    trace = os.environ.get(TRACE_ENV)
    if not trace:
        return
    with open(trace, "a", encoding="utf-8") as fh:
        fh.write(name + "\n")
    if os.environ.get(PAUSE_ENV) == name:
        tmp = f"{trace}.paused.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(name)
        os.replace(tmp, f"{trace}.paused")
        threading.Event().wait()  # until the test kills the process


__all__ = ["crashpoint", "TRACE_ENV", "PAUSE_ENV"]
