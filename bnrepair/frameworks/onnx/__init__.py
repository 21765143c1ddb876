"""ONNX wing: ``.onnx`` models (and in-memory ``onnx.ModelProto``s), run in onnxruntime.

``files`` reads (external data checked) and writes back only BN statistics, ``graph`` finds the
BatchNormalization nodes and builds the measuring copy, ``runner`` measures through onnxruntime, ``fold``
folds BN into its producer and is the wing's export (the model is ONNX already). onnxruntime itself is started
by ``frameworks/onnx_runtime.py``, as ``tf_runtime.py`` imports TensorFlow.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ...options import LoadOptions

TITLE = "an ONNX model"
FORMATS = "ONNX models"
READS = (".onnx",)
FOLDS_TO = (".onnx",)


def sniff(path: Path, head: bytes, members: list[str] | None) -> bool:
    """A file named ``.onnx`` (a protobuf has no magic number; ``files`` refuses one that does not parse)."""
    return members is None and bool(head) and path.suffix == ".onnx"


def load(path: Path, options: LoadOptions, device: str = "auto"):
    from ..onnx_runtime import import_ort
    from .runner import load_file

    import_ort()  # installed and whole, before the file is read
    return load_file(path, options, device)


def claims(model) -> bool:
    return "onnx" in sys.modules and isinstance(model, sys.modules["onnx"].ModelProto)


def wrap(model, device: str = "auto"):
    from .runner import OnnxRunner

    return OnnxRunner(model, device)
