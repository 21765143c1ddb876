"""Pixel scalings that image models are trained with (``--preprocess``), applied to RGB(A)/L uint8."""

from __future__ import annotations

import numpy as np

from ..errors import InputError

_CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

PREPROCESS = ("unit", "raw", "tf", "caffe", "imagenet")


def check_preprocess(how: str) -> str:
    if how not in PREPROCESS:
        raise InputError(f"--preprocess must be one of {', '.join(PREPROCESS)}, got {how!r}")
    return how


def scale_pixels(img: np.ndarray, how: str) -> np.ndarray:
    """``img`` is HWC uint8; returns HWC float32 scaled as the model expects."""
    check_preprocess(how)
    x = img.astype(np.float32)
    if how == "unit":
        return x / 255.0
    if how == "raw":
        return x
    if how == "tf":
        return x / 127.5 - 1.0
    if how == "caffe":  # Keras applications' caffe mode: RGB -> BGR, subtract the ImageNet BGR mean
        if x.shape[-1] != 3:
            return x - _CAFFE_BGR_MEAN.mean()
        return x[..., ::-1] - _CAFFE_BGR_MEAN
    if how == "imagenet":
        x = x / 255.0
        if x.shape[-1] != 3:
            return (x - _IMAGENET_MEAN.mean()) / _IMAGENET_STD.mean()
        return (x - _IMAGENET_MEAN) / _IMAGENET_STD
