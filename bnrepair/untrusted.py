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
    """A zip checkpoint (.keras, torch) whose members are links, name a path outside the archive, or inflate to
    more than the memory left is refused before a member is read."""
    for info in z.infolist():
        name = PurePosixPath(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InputError(f"{path}: archive member {info.filename} is a symbolic link; refusing to read it")
        if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
            raise InputError(f"{path}: archive member {info.filename} names a path outside the archive")
    check_declared(f"{path}: the archive", sum(info.file_size for info in z.infolist()))
