"""Keras wing: ``.h5`` / ``.keras`` files and in-memory ``keras.Model``s, run in Keras on TensorFlow.

``runner`` measures and writes back, ``files`` reads and patches the files, ``config_graph`` reads the
layer graph the model declares, ``fold`` folds BN, ``onnx`` writes ONNX from Keras layers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ...options import LoadOptions


def load(path: Path, options: LoadOptions, device: str = "auto"):
    from .runner import load_file

    return load_file(path, options.custom_objects, options.unsafe, device)


def claims(model) -> bool:
    return "keras" in sys.modules and isinstance(model, sys.modules["keras"].Model)


def wrap(model, device: str = "auto"):
    from .runner import KerasRunner

    return KerasRunner(model, device=device)
