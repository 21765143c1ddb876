"""Calibration data: where samples come from (sources), how they become batches (stream), and what the model
needs them to look like (fit)."""

from .fit import check_fits, image_spec, preprocessing
from .preprocess import PREPROCESS, check_preprocess
from .sources import ArraySource, ImageFolder, ImageSpec, check_path, open_source
from .stream import Batch, Cached, Calibration, IterableCalibration, calibration

__all__ = ["PREPROCESS", "ArraySource", "Batch", "Cached", "Calibration", "ImageFolder", "ImageSpec",
           "IterableCalibration", "calibration", "check_fits", "check_path", "check_preprocess", "image_spec",
           "open_source", "preprocessing"]
