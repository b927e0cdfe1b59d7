"""Drift monitoring shared by the edge box and the trainer.

The trainer builds ``drift_reference.json`` from the training images with :func:`frame_features` and
:func:`build_reference`; the edge box computes the same features on every frame and feeds a
:class:`DriftMonitor`, whose :meth:`~DriftMonitor.snapshot` goes into the reports. numpy + OpenCV only.
"""
from __future__ import annotations

from edge_runtime.drift.detectors import CategoricalDetector, KSDetector, PSIDetector, Score
from edge_runtime.drift.features import (
    FEATURES_VERSION,
    feature_layout,
    frame_features,
    input_features,
    output_features,
)
from edge_runtime.drift.monitor import DriftMonitor, DriftSettings, Hysteresis
from edge_runtime.drift.reference import (
    FILENAME,
    SCHEMA,
    DriftReference,
    build_reference,
    load_reference,
    save_reference,
)
from edge_runtime.drift.stats import ks_2samp, psi

__all__ = [
    "CategoricalDetector",
    "DriftMonitor",
    "DriftReference",
    "DriftSettings",
    "FEATURES_VERSION",
    "FILENAME",
    "Hysteresis",
    "KSDetector",
    "PSIDetector",
    "SCHEMA",
    "Score",
    "build_reference",
    "feature_layout",
    "frame_features",
    "input_features",
    "ks_2samp",
    "load_reference",
    "output_features",
    "psi",
    "save_reference",
]
