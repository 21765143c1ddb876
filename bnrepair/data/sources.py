"""Random-access calibration sources: an image folder decoded lazily, or a .npy / .npz array.

A source knows how many samples it holds and returns any one of them on demand, so the
stream can shuffle indices and never hold more than a few batches in memory.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from ..untrusted import check_declared
from .preprocess import check_preprocess, scale_pixels

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes a model input: size (H, W) or None, channels, scaling, layout."""

    size: tuple[int, int] | None = None
    channels: int = 3
    preprocess: str = "unit"
    channels_first: bool = False
    transform: Callable | None = field(default=None, compare=False)
    """a library's transform of one decoded RGB image into HWC float32 (resize, crop and scaling in one), used in
    place of ``size`` and ``preprocess``"""
    source: str = "the default"
    """where the preprocessing came from (the user, the model, the default), as reports say it"""
    fast_jpeg: bool = False
    """decode JPEGs at a reduced DCT scale (Pillow's ``draft``) when the target is at most half the file's size,
    then resize as always: faster, not identical (measured: per-channel means within 1e-4 std, variances
    within 0.6%, on 1024x768 -> 224x224)"""

    def __post_init__(self):
        if self.transform is None:
            check_preprocess(self.preprocess)


def image_files(root: Path):
    """The image files under ``root``, recursively, in no particular order."""
    return (p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def no_images(root: Path) -> InputError:
    return InputError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")


class ImageFolder:
    """Images found recursively under ``root``; a first-level sub-folder names the class."""

    def __init__(self, root: Path, spec: ImageSpec):
        from PIL import Image

        # Pillow warns of a bomb up to twice its pixel limit and decodes it; ``sample`` refuses it instead. Set
        # once, not per image: ``warnings.catch_warnings`` is not safe on the decoding threads.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        self.root = Path(root)
        self.spec = spec
        self.files = sorted(image_files(self.root))
        if not self.files:
            raise no_images(self.root)
        inside = self.root.resolve()
        for path in self.files:  # rglob never descends into linked folders, so a loop cannot hang it
            if path.is_symlink() and inside not in path.resolve().parents:
                raise InputError(f"{path}: a symbolic link out of {self.root} (to {os.readlink(path)}); refusing "
                                 "to read it (copy the file in, or give the folder it is in)")
        classes = sorted({p.relative_to(self.root).parts[0] for p in self.files
                          if len(p.relative_to(self.root).parts) > 1})
        if classes and all(len(p.relative_to(self.root).parts) > 1 for p in self.files):
            self.classes = classes
            index = {c: i for i, c in enumerate(classes)}
            self.labels = np.array([index[p.relative_to(self.root).parts[0]] for p in self.files])
        else:
            self.classes, self.labels = [], None

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return str(self.files[i])

    def sample(self, i: int) -> np.ndarray:
        return self.finish(self.pixels(i)[None])[0]

    def pixels(self, i: int) -> np.ndarray:
        """Image ``i`` decoded: HWC on the 0-255 scale at the spec's size and channels (uint8, what a cache keeps;
        float32 for 16-bit greyscale)."""
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                if im.width * im.height > Image.MAX_IMAGE_PIXELS:  # Pillow only warns below twice its limit
                    raise InputError(f"{path}: cannot decode image ({im.width}x{im.height} pixels, more than "
                                     f"the {Image.MAX_IMAGE_PIXELS} of Pillow's decompression-bomb limit)")
                pixels = _pixels(im, self.spec)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise InputError(f"{path}: cannot decode image ({exc})") from None
        return pixels[:, :, None] if pixels.ndim == 2 else pixels

    def finish(self, pixels: np.ndarray) -> np.ndarray:
        """A batch of ``pixels`` (N, H, W, C) as the model takes it: scaled by ``--preprocess``, channels first
        where the model wants them."""
        x = pixels if self.spec.transform is not None else scale_pixels(pixels, self.spec.preprocess)
        return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))) if self.spec.channels_first else x


def _pixels(im, spec: ImageSpec) -> np.ndarray:
    """HWC pixels on the 0-255 scale at the spec's size and channels. 16-bit greyscale keeps its precision
    (Pillow's ``convert`` would clip every value above 255 to white)."""
    from PIL import Image

    size = None if spec.size is None else (spec.size[1], spec.size[0])
    if im.mode.startswith("I;16") or im.mode == "I":
        if size is not None and im.size != size:
            im = im.resize(size, Image.BILINEAR)
        grey = np.asarray(im, np.float32)[:, :, None] / 257.0
        if spec.channels == 1:
            return grey
        rgb = np.repeat(grey, 3, axis=2)
        return np.concatenate([rgb, np.full_like(grey, 255.0)], axis=2) if spec.channels == 4 else rgb
    mode = _MODES.get(spec.channels, "RGB")
    if spec.transform is not None:
        return np.asarray(spec.transform(im.convert("RGB")), np.float32)
    if spec.fast_jpeg and size is not None and im.format == "JPEG":
        im.draft(mode, size)  # the smallest DCT scale still >= the target size
    if im.mode != mode:
        im = im.convert(mode)
    if size is not None and im.size != size:
        im = im.resize(size, Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


class ArraySource:
    """Samples along the first axis of an array; used as given (no scaling, no layout change)."""

    def __init__(self, x: np.ndarray, labels: np.ndarray | None = None, origin: str = "array"):
        if x.ndim < 2:
            raise InputError(f"{origin}: expected an array of samples (N, ...), got shape {x.shape}")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise InputError(f"{origin}: expected a real numeric array, got dtype {x.dtype}")
        if labels is not None and (labels.shape != x.shape[:1] or not np.issubdtype(labels.dtype, np.integer)):
            raise InputError(f"{origin}: labels 'y' must be one integer class per sample, shape ({len(x)},); "
                             f"got shape {labels.shape}, dtype {labels.dtype}")
        self.x, self.labels, self.origin = x, labels, origin
        self.classes: list[str] = []

    @classmethod
    def load(cls, path: Path) -> "ArraySource":
        try:
            if path.suffix.lower() == ".npy":
                return cls(np.load(path, mmap_mode="r", allow_pickle=False), origin=str(path))
            with zipfile.ZipFile(path) as z:
                names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
                if "x" in names:
                    key = "x"
                elif len(names) == 1:
                    key = names[0]
                else:
                    raise InputError(f"{path}: holds arrays {names}; name the samples 'x' (and labels 'y')")
                labels = _member(path, z, "y") if "y" in names and key == "x" else None
                return cls(_member(path, z, key), labels, origin=str(path))
        except InputError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"{path}: cannot read array ({exc})") from None

    def __len__(self) -> int:
        return len(self.x)

    def name(self, i: int) -> str:
        return f"{self.origin}[{i}]"

    def sample(self, i: int) -> np.ndarray:
        return np.asarray(self.x[i])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def _member(path: Path, z: zipfile.ZipFile, name: str) -> np.ndarray:
    """Array ``name`` of an .npz. An uncompressed member (``np.savez``) is memory-mapped as a .npy is, so only
    the samples drawn are read; a compressed one (``np.savez_compressed``) is inflated whole, once the size its
    header declares is known to fit in memory (numpy allocates that much before reading a byte)."""
    info = z.getinfo(f"{name}.npy")
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:  # 3.0: structured dtypes with non-Latin-1 field names, never a numeric array
            raise InputError(f"{path}: array {name!r} is in .npy format {version}, not a plain numeric array")
        shape, fortran, dtype = read_header(f)
        header = f.tell()
    if dtype.hasobject:
        raise InputError(f"{path}: array {name!r} holds Python objects, which are not read (no pickle)")
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)
        name_and_extra = int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_and_extra  # past the member's local header
        if header + nbytes > info.file_size:
            raise InputError(f"{path}: array {name!r} declares shape {shape}, more than its {info.file_size} "
                             "bytes hold")
        return np.memmap(path, dtype, "r", start + header, shape, "F" if fortran else "C")
    check_declared(f"{path}: array {name!r} of shape {shape}", nbytes,
                   "save it uncompressed (np.savez) or as .npy, which are read lazily")
    with z.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def check_path(data) -> None:
    """A data path that does not exist, is neither a file nor a folder (a FIFO would block reading it), is a
    file of another kind, or a folder without images: refused before any model is loaded."""
    if not isinstance(data, (str, os.PathLike)):
        return
    path = Path(data)
    if not path.exists():
        raise InputError(f"{data}: no such file or folder")
    if not (path.is_file() or path.is_dir()):
        raise InputError(f"{data}: not a regular file or a folder")
    if path.is_file() and path.suffix.lower() not in (".npy", ".npz"):
        raise InputError(f"{path}: calibration data must be an image folder, a .npy or a .npz file")
    if path.is_dir() and next(image_files(path), None) is None:  # stops at the first image
        raise no_images(path)


def open_source(data, spec: ImageSpec):
    """A path to an image folder, .npy or .npz file, or an in-memory array, as a source."""
    if isinstance(data, np.ndarray):
        return ArraySource(data)
    check_path(data)
    path = Path(data)
    return ImageFolder(path, spec) if path.is_dir() else ArraySource.load(path)
