"""Pick the framework a checkpoint belongs to from its contents, importing only that framework.

Each framework module exposes ``load(path, **options) -> runner`` and a runner class built from an
in-memory model. ``bnrepair --help`` and a Keras user's run never import torch, and vice versa.
"""

from __future__ import annotations

import importlib
import sys
import zipfile
from pathlib import Path

import h5py

from ..errors import InputError


def detect(path: Path) -> str:
    """``keras``, ``torch``, ``savedmodel`` or ``onnx``, from what the file holds (not its suffix)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return "savedmodel"
        raise InputError(f"{path}: a folder that is not a TensorFlow SavedModel (no saved_model.pb)")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if not head:
        raise InputError(f"{path}: empty file")
    if h5py.is_hdf5(path) or head.startswith(b"\x89HDF"):
        return "keras"
    if zipfile.is_zipfile(path) or head.startswith(b"PK\x03\x04"):  # a zip cut short has lost its directory
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            raise InputError(f"{path}: damaged or truncated zip archive (not completely written or copied?)") \
                from None
        if "config.json" in names and "metadata.json" in names:
            return "keras"
        if any(n.endswith("data.pkl") or n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torch"
        raise InputError(f"{path}: zip archive that is neither a .keras model nor a torch checkpoint")
    if head[:1] == b"\x80":  # legacy (non-zip) torch.save pickle
        return "torch"
    if path.suffix == ".onnx":
        return "onnx"
    raise InputError(f"{path}: unrecognised checkpoint format (expected .h5, .keras, .pt, SavedModel or .onnx)")


def module(framework: str):
    try:
        return importlib.import_module(f"{__name__}.{framework}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(__name__):
            raise InputError(f"{framework} checkpoints are not supported yet") from None
        raise


def load(path: Path, **options):
    return module(detect(path)).load(Path(path), **options)


def wrap(model, **options):
    """A runner for a model already in memory (a ``keras.Model`` or a ``torch.nn.Module``)."""
    if "keras" in sys.modules and isinstance(model, sys.modules["keras"].Model):
        from .keras import KerasRunner

        return KerasRunner(model, device=options.get("device", "auto"))
    if "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module):
        from .torch import TorchRunner

        return TorchRunner(model, **options)
    raise InputError(f"cannot recalibrate a {type(model).__name__}: pass a keras.Model, a torch.nn.Module "
                     "or a checkpoint path")
