"""The registry: which framework wing a checkpoint path or an in-memory model belongs to.

A wing is a sub-package (``keras/``, ``torch/``, ``savedmodel/``) with the same entry points in its
``__init__``: ``load(path, options, device)`` and ``wrap(model, device)`` return a ``protocols.Runner``,
and ``claims(model)`` says whether an in-memory model is the wing's without importing its framework.
Only the chosen wing's framework is ever imported: ``bnrepair --help`` and a Keras user's run never
import torch, and vice versa. ``docs/architecture.md`` says how to add a wing.
"""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path

import h5py

from ..errors import InputError
from ..options import LoadOptions
from ..untrusted import check_archive

TITLES = {"keras": "a Keras file", "torch": "a PyTorch checkpoint", "savedmodel": "a TensorFlow SavedModel",
          "onnx": "an ONNX model", "tf1": "a TF1 training checkpoint"}
"""Every format the registry recognises, by wing name, as messages name a file of that format."""
WINGS = ("keras", "torch", "savedmodel", "onnx", "tf1")
"""The formats with a wing."""
FOLD_SUFFIXES = {"keras": (".keras", ".h5"), "torch": (".pt2",), "onnx": (".onnx",)}
"""What a wing's folded model is written as (besides ONNX), the first the default; known before it loads."""


def detect(path: Path) -> str:
    """The wing name for ``path``, from what the file holds (not its suffix)."""
    from .tf1.files import is_checkpoint

    path = Path(path)
    if is_checkpoint(path):
        return "tf1"
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return "savedmodel"
        raise InputError(f"{path}: a folder that is neither a TensorFlow SavedModel (no saved_model.pb) nor a "
                         "TF1 model folder (no checkpoint file)")
    if not path.is_file():  # a FIFO or a device would block the read below, or never end
        raise InputError(f"{path}: not a regular file")
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
                check_archive(path, z)
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
    raise InputError(f"{path}: unrecognised checkpoint format (expected .h5, .keras, .pt, SavedModel, .onnx or a "
                     "TF1 checkpoint prefix)")


def checkpoint_of(path: Path, options: LoadOptions) -> Path:
    """The file or folder ``path`` stands for, which an output is named after: a TF1 model folder or checkpoint
    file stands for its checkpoint prefix (``--step`` choosing); any other path for itself."""
    from .tf1.files import is_checkpoint, resolve

    return resolve(Path(path), options.step) if is_checkpoint(Path(path)) else Path(path)


def wing(name: str):
    """The wing package ``name`` (imports none of its framework)."""
    return importlib.import_module(f"{__name__}.{name}")


def load(path: Path, options: LoadOptions, device: str = "auto"):
    """A runner for the checkpoint at ``path``; options of another format are refused first."""
    path = Path(path)
    name = detect(path)
    options.check_applies(name, path, TITLES[name])
    return wing(name).load(path, options, device)


def claimant(model) -> str:
    """The wing name of a model already in memory (a ``keras.Model``, a ``torch.nn.Module``)."""
    for name in WINGS:
        if wing(name).claims(model):
            return name
    raise InputError(f"cannot recalibrate a {type(model).__name__}: pass a keras.Model, a torch.nn.Module "
                     "or a checkpoint path")


def wrap(model, device: str = "auto"):
    """A runner for a model already in memory."""
    return wing(claimant(model)).wrap(model, device)
