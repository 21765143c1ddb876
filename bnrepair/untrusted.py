"""What an untrusted file may make bnrepair do before it is read. Sizes it declares (a zip member's inflated
size, an array's shape) are checked against the memory left, so a few kilobytes cannot ask for gigabytes;
an archive's members may not be links or name paths outside it."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import PurePosixPath

from .errors import InputError


def available_memory() -> int | None:
    """Bytes of memory this process could still take, or None where the system does not say.

    Linux's ``MemAvailable`` counts reclaimable page cache; elsewhere the physical size is the bound.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def gib(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.3g} GiB"


def check_declared(what: str, nbytes: int, hint: str = "") -> None:
    """Refuse ``what`` when what it declares would not fit in the memory left."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise InputError(f"{what} declares {gib(nbytes)} once read, more than the {gib(free)} of memory "
                         f"available{'; ' + hint if hint else ''}")


def check_archive(path, z: zipfile.ZipFile) -> None:
    """A zip checkpoint (.keras, torch) whose members are links, name a path outside the archive, inflate as a
    bomb does, or inflate to more than the memory left is refused before a member is read."""
    for info in z.infolist():
        name = PurePosixPath(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InputError(f"{path}: archive member {info.filename} is a symbolic link; refusing to read it")
        if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
            raise InputError(f"{path}: archive member {info.filename} names a path outside the archive")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > BOMB_FLOOR and ratio > BOMB_RATIO:
            raise InputError(f"{path}: archive member {info.filename} inflates {ratio:.0f}-fold (to "
                             f"{gib(info.file_size)}), as a decompression bomb does; refusing to read it")
    check_declared(f"{path}: the archive", sum(info.file_size for info in z.infolist()))


BOMB_RATIO, BOMB_FLOOR = 100, 64 << 20
"""A compressed member past 64 MiB that inflates more than 100-fold is refused whatever memory is free: weights compress
to little less than their size (torch stores them uncompressed, Keras's deflate gains a few percent), while a
bomb's zeros reach zlib's 1032-fold and would take the machine's memory before torch or h5py checked a byte."""
