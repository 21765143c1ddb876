"""The registry: which framework wing a checkpoint path or an in-memory model belongs to.

A wing is a sub-package (``keras/``, ``torch/``, ``savedmodel/``, ``onnx/``, ``tf1/``) that declares its own
facts in its ``__init__``: ``TITLE`` (how a message names one of its files), ``FORMATS`` (how an option that
applies to them names them all), ``READS`` (what the unrecognised-format message expects), ``FOLDS_TO`` (what
a folded model is written as besides ONNX, the first the default), optionally ``FOLDER`` / ``ARCHIVE`` (what
it takes as a folder / zip archive) and ``MISNAMED`` (the suffixes of its files, and what to say of a file so
named that is not one), and ``sniff(path, head, members)``, which recognises its files from what they hold.
Its entry points ``load(path, options, device)`` and ``wrap(model, device)`` return a ``protocols.Runner``,
and ``claims(model)`` says whether an in-memory model is the wing's without importing its framework. The
registry only loops over the wings: only the chosen wing's framework is ever imported, so ``bnrepair --help``
and a Keras user's run never import torch, and vice versa. ``docs/architecture.md`` says how to add a wing.
"""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path

from ..errors import InputError
from ..options import LoadOptions
from ..untrusted import check_archive

WINGS = ("tf1", "savedmodel", "keras", "torch", "onnx")
"""Every format with a wing, in the order they are asked whether a path is theirs."""


def wing(name: str):
    """The wing package ``name`` (imports none of its framework)."""
    return importlib.import_module(f"{__name__}.{name}")


def listed(words, conjunction: str = "or") -> str:
    """'a', 'a or b', 'a, b or c'."""
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def detect(path: Path) -> str:
    """The wing name for ``path``, from what the file holds (not its suffix)."""
    path = Path(path)
    if wing("tf1").sniff(path, b"", None):  # a prefix names no file of its own
        return "tf1"
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        name = next((n for n in WINGS if wing(n).sniff(path, b"", None)), None)
        if name is None:
            folders = [wing(n).FOLDER for n in WINGS if hasattr(wing(n), "FOLDER")]
            raise InputError(f"{path}: a folder that is neither {' nor '.join(folders)}")
        return name
    if not path.is_file():  # a FIFO or a device would block the read below, or never end
        raise InputError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if not head:
        raise InputError(f"{path}: empty file")
    members = _members(path, head)
    name = next((n for n in WINGS if wing(n).sniff(path, head, members)), None)
    if name is not None:
        return name
    if members is not None:
        archives = [wing(n).ARCHIVE for n in WINGS if hasattr(wing(n), "ARCHIVE")]
        raise InputError(f"{path}: zip archive that is neither {' nor '.join(archives)}")
    for name in WINGS:  # named like a wing's files, but not one of them
        suffixes, why = getattr(wing(name), "MISNAMED", ((), ""))
        if path.suffix.lower() in suffixes:
            raise InputError(f"{path}: {why}")
    expected = [suffix for n in WINGS for suffix in wing(n).READS]
    raise InputError(f"{path}: unrecognised checkpoint format (expected {listed(expected)})")


def _members(path: Path, head: bytes) -> list[str] | None:
    """The member names of a zip archive (checked first: no links, nothing leaving it, no bomb), else None."""
    if not (zipfile.is_zipfile(path) or head.startswith(b"PK\x03\x04")):  # a zip cut short has lost its directory
        return None
    try:
        with zipfile.ZipFile(path) as z:
            check_archive(path, z)
            return z.namelist()
    except zipfile.BadZipFile:
        raise InputError(f"{path}: damaged or truncated zip archive (not completely written or copied?)") from None


def checkpoint_of(path: Path, options: LoadOptions) -> Path:
    """The file or folder ``path`` stands for, which an output is named after: what the wing's ``checkpoint_of``
    says where it has one (a TF1 model folder or checkpoint file stands for its prefix), else ``path`` itself."""
    path = Path(path)
    for name in WINGS:
        named = getattr(wing(name), "checkpoint_of", None)  # the wings whose paths may name other files
        if named is not None and wing(name).sniff(path, b"", None):
            return named(path, options)
    return path


def refuse_foreign(options: LoadOptions, name: str, path: Path) -> None:
    """Refuse an option that the format ``name`` cannot use, naming the formats that can."""
    for flag, applies in options.foreign(name):
        formats = listed((wing(n).FORMATS for n in applies), "and")
        raise InputError(f"{flag} applies to {formats}; {path} is {wing(name).TITLE}")


def load(path: Path, options: LoadOptions, device: str = "auto"):
    """A runner for the checkpoint at ``path``; options of another format are refused first."""
    path = Path(path)
    name = detect(path)
    refuse_foreign(options, name, path)
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
