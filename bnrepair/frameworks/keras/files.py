"""Where Keras files keep BN statistics, and patching exactly those values (h5py only, no TensorFlow).

Two layouts: the legacy HDF5 file (``model_weights/<layer>/<weight name>``, written by Keras 2 and
Keras 3 alike, names ending in ``:0`` under Keras 2) and the Keras 3 ``.keras`` zip, whose
``model.weights.h5`` is addressed by the saveable tree (``layers/batch_normalization_1/vars/2``).
Patching rewrites only those datasets in a copy: every other byte of config, weights and optimizer
state stays as the user saved it.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from ...errors import InputError
from ...writers import atomic_path, storable

KERAS_WEIGHTS = "model.weights.h5"
SUFFIXES = {"h5": (".h5", ".hdf5"), "keras": (".keras",)}


def file_kind(path: Path) -> str:
    """``"h5"`` or ``"keras"``, from the file's contents."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if "config.json" in names and KERAS_WEIGHTS in names:
                with z.open(KERAS_WEIGHTS) as member, h5py.File(member, "r") as f:
                    refuse_external_links(f, f"{path}: {KERAS_WEIGHTS}")
                return "keras"
        if "config.json" in names:
            raise InputError(f"{path}: .keras archive without {KERAS_WEIGHTS} (sharded or npz weights "
                             "are not supported)")
        raise InputError(f"{path}: zip archive that is not a Keras 3 .keras file")
    if h5py.is_hdf5(path):
        try:
            with h5py.File(path, "r") as f:
                has_config = "model_config" in f.attrs
                refuse_external_links(f, str(path))
        except OSError as exc:
            raise InputError(f"{path}: damaged or truncated HDF5 file ({exc})") from None
        if not has_config:
            raise InputError(f"{path}: HDF5 file without a model config (weights only?); "
                             "save the whole model with model.save()")
        return "h5"
    raise InputError(f"{path}: not a Keras .h5 or .keras file")


def refuse_external_links(f: h5py.File, origin: str) -> None:
    """An HDF5 external link makes whoever reads the weights open another file, wherever its author pointed it:
    refused, naming the link (Keras refuses it too, but in its own words or not at all)."""
    links = []
    f.visititems_links(lambda name, link: links.append((name, link)) if isinstance(link, h5py.ExternalLink)
                       else None)
    if links:
        name, link = links[0]
        raise InputError(f"{origin}: '{name}' is an HDF5 external link to {link.filename}:{link.path} "
                         f"({len(links)} in all); weights must be stored in the file itself")


@contextmanager
def keras_name(path: Path, kind: str):
    """``path`` under a name Keras reads as ``kind``: Keras picks its reader by suffix, bnrepair by contents,
    so ``model.ckpt`` or an HDF5 model named ``.keras`` is read through a link with the right suffix."""
    if path.name.endswith(SUFFIXES[kind]):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bnrepair-") as folder:
        link = Path(folder) / f"model{SUFFIXES[kind][0]}"
        link.symlink_to(path.resolve())
        yield link


def check_dataset(f: h5py.File, path: str, expected: np.ndarray, origin: str) -> None:
    """The dataset at ``path`` must hold exactly the value Keras loaded from it."""
    if path not in f or not isinstance(f[path], h5py.Dataset):
        raise InputError(f"{origin}: expected BN statistics at '{path}', found nothing there")
    stored = f[path][()]
    if stored.shape != expected.shape or not np.array_equal(stored.astype(expected.dtype), expected,
                                                            equal_nan=expected.dtype.kind == "f"):
        raise InputError(f"{origin}: '{path}' does not hold the loaded BN statistics")


def patch_h5(f: h5py.File, values: dict[str, np.ndarray], origin: str) -> None:
    for path, value in values.items():
        ds = f[path]
        ds[...] = storable(value, ds.dtype, f"{origin}: {path}").reshape(ds.shape)


def write_patched(source: Path, dest: Path, kind: str, values: dict[str, np.ndarray]) -> None:
    """Copy ``source`` to ``dest`` atomically with only the datasets in ``values`` rewritten."""
    with atomic_path(dest) as tmp:
        if kind == "h5":
            shutil.copyfile(source, tmp)
            with h5py.File(tmp, "r+") as f:
                patch_h5(f, values, str(source))
            return
        with zipfile.ZipFile(source) as zin, zipfile.ZipFile(tmp, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info)
                if info.filename == KERAS_WEIGHTS:
                    data = _patched_bytes(data, values, f"{source}: {KERAS_WEIGHTS}")
                zout.writestr(info, data)


def _patched_bytes(data: bytes, values: dict[str, np.ndarray], origin: str) -> bytes:
    """The archive member patched in memory: no scratch file that another user could race for."""
    buffer = io.BytesIO(data)
    with h5py.File(buffer, "r+") as f:
        patch_h5(f, values, origin)
    return buffer.getvalue()


@contextmanager
def open_weights(path: Path, kind: str):
    """The HDF5 file that holds the weights: the ``.h5`` itself or the ``.keras`` archive's member."""
    if kind == "h5":
        with h5py.File(path, "r") as f:
            yield f
        return
    with zipfile.ZipFile(path) as z:
        data = z.read(KERAS_WEIGHTS)
    with h5py.File(io.BytesIO(data), "r") as f:
        yield f
