"""How decoded images become model inputs (``--preprocess``), and where that choice came from.

Three kinds: the built-in pixel scalings below (after a plain resize to the model's input size); a named preset
of a library users have (``keras:mobilenet_v2`` through ``keras.applications``' own ``preprocess_input``,
``torchvision:ResNet50_Weights.IMAGENET1K_V2`` through that weights entry's own transform); and what a model
folder declares (``Declared``: timm's ``pretrained_cfg``, a Hugging Face image processor), run by its library.
A library's transform takes the decoded image whole (its resize, crop, interpolation and scaling), so the
statistics are those of the inputs the model sees at inference.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError, first_line

_CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

PREPROCESS = ("unit", "raw", "tf", "caffe", "imagenet")
PRESETS = ("keras:", "torchvision:")
DEFAULT = "unit"


@dataclass(frozen=True)
class Declared:
    """Preprocessing a model declares: what it is, where it was declared, and its library's transform of one
    decoded RGB ``PIL.Image`` into an HWC float32 array."""

    name: str
    source: str
    transform: Callable


def check_preprocess(how: str | None) -> str | None:
    """``how`` when it names a scaling or a preset whose library has it (checked before any work), else an error."""
    if how is None or how in PREPROCESS:
        return how
    if how.startswith(PRESETS):
        _preset(how)
        return how
    raise InputError(f"--preprocess must be one of {', '.join(PREPROCESS)}, or a preset keras:APPLICATION "
                     f"(e.g. keras:mobilenet_v2) or torchvision:WEIGHTS (e.g. torchvision:ResNet50_Weights.DEFAULT), "
                     f"got {how!r}")


def chosen(how: str | None, declared: Declared | None) -> tuple[str, str, Callable | None]:
    """The preprocessing a run uses: its name, where it came from, and the library transform (None for a
    scaling after the plain resize)."""
    if how is not None:
        transform = _preset(how) if how.startswith("torchvision:") else None
        return how, "named by the user with --preprocess", transform
    if declared is not None:
        return declared.name, declared.source, declared.transform
    return DEFAULT, "the default: the model declares none", None


def _preset(how: str):
    """The library object a preset names: keras.applications' ``preprocess_input``, or a torchvision weights
    entry's transform of one image."""
    library, _, name = how.partition(":")
    try:
        if library == "keras":
            from ..frameworks.tf_runtime import import_keras

            keras, _ = import_keras()
            return importlib.import_module(f"keras.applications.{name}").preprocess_input
        import torchvision

        transform = torchvision.models.get_weight(name).transforms()
        return lambda image: transform(image).numpy().transpose(1, 2, 0)
    except (ImportError, AttributeError, KeyError, ValueError) as exc:
        raise InputError(f"--preprocess {how}: {library} has no such preset ({first_line(exc)})") from None


def scale_pixels(img: np.ndarray, how: str) -> np.ndarray:
    """``img`` is HWC (or NHWC) on the 0-255 scale; returns float32 scaled as the model expects."""
    x = img.astype(np.float32)
    if how.startswith("keras:"):  # resolving the preset checks it
        return np.asarray(_preset(how)(x), np.float32)
    check_preprocess(how)
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
    raise InputError(f"--preprocess {how}: a transform of whole images, not a scaling")
