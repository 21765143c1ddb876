"""TensorFlow shared by the Keras and SavedModel wings: quiet imports of TF and Keras, the device to run on, and
tf2onnx's conversion of an inference function."""

from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager

from ..errors import BnrepairError, InputError, first_line, require
from ..options import on_gpu


@contextmanager
def native_stderr_silenced():
    """TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) bypasses TF_CPP_MIN_LOG_LEVEL."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow():
    """TensorFlow, imported without its start-up chatter, or a message saying which extra to install.

    oneDNN is asked for unless the caller chose: TensorFlow turns it on by itself only on CPUs with AVX-512
    and the like, and without it a CPU runs no channels_first convolution at all ("Conv2D op currently only
    supports the NHWC tensor format on the CPU"), so a channels_first model would run on one machine and not
    on the next."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    try:
        if "tensorflow" in sys.modules:
            import tensorflow as tf
        else:
            triton_first()
            with native_stderr_silenced():
                import tensorflow as tf

                tf.config.list_physical_devices("GPU")
    except ImportError as exc:
        raise BnrepairError(f"this model needs TensorFlow ({exc}); from the bnrepair checkout: "
                            "pip install '.[keras]'") from None
    return tf


def triton_first() -> None:
    """Import triton (which CUDA builds of torch bring) before TensorFlow: its native library, loaded into a
    process that has TensorFlow's, crashes it (torch imports it for torch.export, timm and torchvision do
    through torch._dynamo); loaded first, both work."""
    import importlib.util

    if "triton" not in sys.modules and importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


def import_keras():
    """Import Keras on the TensorFlow backend, quietly, or say which extra to install."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    tf = import_tensorflow()
    try:
        import keras
    except ImportError as exc:
        raise BnrepairError(f"Keras models need TensorFlow and Keras ({exc}); "
                            "from the bnrepair checkout: pip install '.[keras]'") from None
    if keras.backend.backend() != "tensorflow":
        raise BnrepairError(f"bnrepair runs Keras models on the TensorFlow backend, "
                            f"but KERAS_BACKEND is {keras.backend.backend()!r}")
    return keras, tf


def held_corrections(held: dict, corrections: dict | None, device: str) -> frozenset:
    """Each layer's drift correction (``drift.Drift.corrections``) put into float32 ``tf.Variable``s kept in
    ``held``: made once per layer, assigned every batch, so the one traced function of a corrected pass reads
    them all pass long. The corrected layers."""
    import numpy as np

    tf = import_tensorflow()
    for layer_id, arrays in (corrections or {}).items():
        if layer_id not in held:
            with tf.device(device):
                held[layer_id] = tuple(tf.Variable(np.asarray(a, np.float32), trainable=False) for a in arrays)
        for variable, a in zip(held[layer_id], arrays):
            variable.assign(np.asarray(a, np.float32))
    return frozenset(corrections or ())


def per_channel(tf, reduce, x, axes: list[int]):
    """``reduce`` (``tf.reduce_sum`` / ``tf.reduce_mean``) of ``x`` over ``axes``, per sample first, then over the
    batch: float32 sums of fewer terms each, which eval mode's joined forwards (many samples) need."""
    inner = [i for i in axes if i != 0]
    return reduce(reduce(x, axis=inner, keepdims=True), axis=axes)


def resolve_device(tf, device: str) -> str:
    return "/GPU:0" if on_gpu(device, bool(tf.config.list_physical_devices("GPU")), "TensorFlow sees no GPU") \
        else "/CPU:0"


def data_misfit(exc: Exception, inputs) -> InputError:
    """A calibration batch the model cannot take, in one line of TensorFlow's message: for an error raised
    inside a traced call ("in user code:", a stack, then the error; Keras adds a heading and the call's
    arguments), the error itself; else the first line, without the dump of the batch."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    reason = lines[0].split(" Received args:")[0] if lines else type(exc).__name__
    if reason.startswith("in user code:"):
        at = max((i for i, line in enumerate(lines) if re.match(r"\w+(Error|Exception): ", line)),
                 default=len(lines) - 1)
        heading = "Exception encountered when calling" in lines[at] and at + 1 < len(lines)
        reason = lines[at + heading]
    shape = f"{tuple(inputs.shape)} {inputs.dtype}" if hasattr(inputs, "shape") else type(inputs).__name__
    return InputError(f"the model's forward pass failed on a calibration batch ({shape}): {reason}")


def tf2onnx_converted(function, spec, opset: int, what: str):
    """tf2onnx's ONNX of the ``tf.function`` ``function`` (input ``spec``) at ``opset``, or the newest tf2onnx
    writes where that is older; an op it cannot convert is one line naming ``what``. Its notes on freezing the
    graph are not the user's to act on, and are silenced."""
    require(("tf2onnx",), f"ONNX export of {what}", "onnx")
    import tf2onnx
    from tf2onnx import constants

    chatter = logging.getLogger("tf2onnx")
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    try:
        proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec],
                                                 opset=min(opset, max(constants.OPSET_TO_IR_VERSION)))
    except Exception as exc:  # an op tf2onnx has no conversion for, named in its message
        raise InputError(f"tf2onnx cannot convert {what}: {first_line(exc)}") from None
    finally:
        chatter.setLevel(level)
    return proto
