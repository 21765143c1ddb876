"""TensorFlow shared by the Keras and SavedModel runners: a quiet import and the device to run on."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from ..errors import BnrepairError


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
    """TensorFlow, imported without its start-up chatter, or a message saying which extra to install."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if "tensorflow" in sys.modules:
            import tensorflow as tf
        else:
            with native_stderr_silenced():
                import tensorflow as tf

                tf.config.list_physical_devices("GPU")
    except ImportError as exc:
        raise BnrepairError(f"this model needs TensorFlow ({exc}); install it with: pip install 'bnrepair[keras]'") \
            from None
    return tf


def resolve_device(tf, device: str) -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if device in ("gpu", "cuda"):
        if not gpus:
            raise BnrepairError("--device gpu: TensorFlow sees no GPU on this machine")
        return "/GPU:0"
    if device == "cpu" or not gpus:
        return "/CPU:0"
    if device != "auto":
        raise BnrepairError(f"--device must be auto, cpu or gpu, got {device!r}")
    return "/GPU:0"
