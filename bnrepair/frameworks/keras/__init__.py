"""Keras wing: ``.h5`` / ``.keras`` files and in-memory ``keras.Model``s, run in Keras on TensorFlow.

``runner`` measures and writes back, ``files`` reads and patches the files, ``config_graph`` reads the
layer graph the model declares, ``fold`` folds BN, ``onnx`` writes ONNX from Keras layers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py

from ...options import LoadOptions

TITLE = "a Keras file"
FORMATS = "Keras .h5/.keras files"
READS = (".h5", ".keras")
FOLDS_TO = (".keras", ".h5")
ARCHIVE = "a .keras model"
MISNAMED = ((".h5", ".hdf5", ".keras"), "not a Keras file (neither HDF5 nor a zip archive)")


def sniff(path: Path, head: bytes, members: list[str] | None) -> bool:
    """An HDF5 file (``.h5``), or a zip archive with a Keras 3 config and metadata (``.keras``)."""
    if members is not None:
        return "config.json" in members and "metadata.json" in members
    return bool(head) and (head.startswith(b"\x89HDF") or h5py.is_hdf5(path))


def load(path: Path, options: LoadOptions, device: str = "auto"):
    from .runner import load_file

    return load_file(path, options, device)


def claims(model) -> bool:
    return "keras" in sys.modules and isinstance(model, sys.modules["keras"].Model)


def wrap(model, device: str = "auto"):
    from .runner import KerasRunner

    return KerasRunner(model, device=device)
