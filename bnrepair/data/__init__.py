"""Calibration data: where samples come from (sources), how they become batches (stream)."""

from .sources import ArraySource, ImageFolder, ImageSpec, open_source
from .stream import Calibration, IterableCalibration, calibration

__all__ = ["ArraySource", "Calibration", "ImageFolder", "ImageSpec", "IterableCalibration",
           "calibration", "open_source"]
