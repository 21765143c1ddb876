"""Calibration data: where samples come from (sources), how they become batches (stream)."""

from .sources import ArraySource, ImageFolder, ImageSpec, open_source
from .stream import Batch, Cached, Calibration, IterableCalibration, calibration

__all__ = ["ArraySource", "Batch", "Cached", "Calibration", "ImageFolder", "ImageSpec", "IterableCalibration",
           "calibration", "open_source"]
