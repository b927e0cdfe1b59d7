"""MKL's kernel choice on AMD CPUs: one switch, read once per process.

Its own module because two callers must apply it before paddle's first computation of the process: the training
session (:mod:`detect.session`) and the Fisher pass a retrain runs before its session (:mod:`detect.ewc`).
"""
from __future__ import annotations

import os


def prefer_mkl_avx2(enabled: bool = True) -> bool:
    """On an AMD CPU with AVX2, ask paddle's MKL for its AVX2 kernels (``MKL_DEBUG_CPU_TYPE=5``).

    MKL dispatches on the CPU vendor and runs a generic path on non-Intel CPUs; paddle's CPU convolutions and
    matrix products go through it. MKL reads the variable at its first call, so this must happen before any
    paddle computation of the process (a later call changes nothing); a value already set is left alone.
    Returns whether the variable is now 5."""
    if enabled and "MKL_DEBUG_CPU_TYPE" not in os.environ:
        try:
            info = open("/proc/cpuinfo", encoding="utf-8").read(8192)
        except OSError:
            info = ""
        if "AuthenticAMD" in info and " avx2" in info:
            os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    return os.environ.get("MKL_DEBUG_CPU_TYPE") == "5"


__all__ = ["prefer_mkl_avx2"]
