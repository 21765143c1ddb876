"""ONNX wing: ``.onnx`` models (and in-memory ``onnx.ModelProto``s), run in onnxruntime.

``files`` reads (external data checked) and writes back only BN statistics, ``graph`` finds the
BatchNormalization nodes and builds the measuring copy, ``runner`` measures through onnxruntime, ``fold``
folds BN into its producer and is the wing's export (the model is ONNX already).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ...options import LoadOptions


def load(path: Path, options: LoadOptions, device: str = "auto"):
    from ...deploy import require_onnx
    from .runner import load_file

    require_onnx()
    return load_file(path, device, options.input_name)


def claims(model) -> bool:
    return "onnx" in sys.modules and isinstance(model, sys.modules["onnx"].ModelProto)


def wrap(model, device: str = "auto"):
    from .runner import OnnxRunner

    return OnnxRunner(model, device)
