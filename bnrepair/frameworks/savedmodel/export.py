"""``protocols.Exporter`` for a SavedModel (and a TF1 checkpoint): ONNX export through tf2onnx.

The graph exported is the one bnrepair runs and verifies: the signature's outputs computed from the
calibration input, with the statistics the runner holds now (recalibrated ones after ``recalibrate``),
traced into a ``tf.function`` that tf2onnx converts with its variables frozen. A graph has no layers whose
weights could take a BN in: fold the Keras or torch checkpoint the SavedModel came from.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ...errors import require
from ..tf_runtime import import_tensorflow, tf2onnx_converted

UNFOLDABLE = ("a SavedModel is a graph, without layers whose weights could take a BN in: export it without "
              "--fold, or fold the Keras or torch checkpoint it came from")
"""why nothing folds (``SavedModelRunner.folder``)"""


@contextmanager
def precise():
    """Full float32 while verifying (no TF32 on GPUs)."""
    tf = import_tensorflow()
    before = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(before)


def source(model):
    """The runner itself: it runs the saved graph with the statistics it holds."""
    return model


def run(model, x) -> list[np.ndarray]:
    """The signature's outputs, sorted by name (as ``tf.function`` flattens the dict tf2onnx converts)."""
    return [value for _, value in sorted(model.infer(model.cast_input(x)).items())]


def output_names(model, example) -> list[str]:
    return sorted(model.infer(model.cast_input(example[:1])))


def max_opset() -> int:
    require(("tf2onnx",), "ONNX export of a SavedModel", "onnx")
    from tf2onnx import constants

    return max(constants.OPSET_TO_IR_VERSION)


def to_onnx(model, example, opset: int):
    """tf2onnx's conversion of the runner's inference function, with a dynamic batch axis."""
    function, spec = model.inference_function()
    return tf2onnx_converted(function, spec, opset, "the signature's graph")
