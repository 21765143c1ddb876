"""``.safetensors`` files (how timm and Hugging Face store weights): read with the ``safetensors`` library, written
back by patching the repaired tensors' bytes in a copy of the file.

The format is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and byte range
in the data that follows, and an optional ``__metadata__``), then the raw tensors. It holds no code, so no
opt-in is needed. The header is checked here before the library reads a byte of data (a header longer than the
file, ranges outside it: one line naming the file); the writer keeps every other byte as it was (keys, order,
dtypes, metadata, alignment), which a re-serialisation would only promise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ...errors import InputError, first_line
from ...writers import atomic_path

HEADER_MAX = 100 * 2**20
"""the largest header the ``safetensors`` library itself accepts"""


def is_safetensors(path: Path, head: bytes) -> bool:
    """Whether ``path`` (whose first 8 bytes are ``head``) is a safetensors file: named so (a damaged one is then
    told as such), or a plausible header length followed by a JSON object."""
    if Path(path).suffix == ".safetensors":
        return True
    if len(head) < 8:
        return False
    length = int.from_bytes(head[:8], "little")
    if not 2 <= length <= min(HEADER_MAX, Path(path).stat().st_size - 8):
        return False
    with open(path, "rb") as f:
        f.seek(8)
        return f.read(1) == b"{"


def header(path: Path) -> tuple[int, dict]:
    """Where the data starts, and the header (without ``__metadata__``), checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8 or length > HEADER_MAX:
            raise InputError(f"{path}: damaged safetensors file: its header claims {length} bytes, the file has "
                             f"{max(size - 8, 0)} after the length")
        try:
            table = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: damaged safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(table, dict):
        raise InputError(f"{path}: damaged safetensors file: its header is not a JSON object")
    table.pop("__metadata__", None)
    start = 8 + length
    for name, entry in table.items():
        begin, end = (entry.get("data_offsets") or [0, -1]) if isinstance(entry, dict) else (0, -1)
        if not 0 <= begin <= end or start + end > size:
            raise InputError(f"{path}: damaged safetensors file: tensor {name!r} lies outside the file "
                             "(truncated?)")
    return start, table


def read(path: Path) -> dict:
    """Every tensor of the file, by name, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the safetensors file ({first_line(exc)})") from None


def write(source: Path, output: Path, tensors: dict) -> None:
    """``source`` copied to ``output`` atomically with the bytes of ``tensors`` (name -> tensor, in its stored
    dtype and shape) replaced."""
    header(source)
    with atomic_path(Path(output)) as tmp:
        shutil.copyfile(source, tmp)
        patch(tmp, tensors, source)


def patch(path: Path, tensors: dict, source: Path) -> None:
    """Overwrite, in the copy ``path`` of ``source``, the bytes of ``tensors``; nothing else moves."""
    start, table = header(Path(path))
    with open(path, "r+b") as f:
        for name, tensor in tensors.items():
            begin, end = table[name]["data_offsets"]
            data = _raw_bytes(tensor)
            if len(data) != end - begin:
                raise InputError(f"{source}: tensor {name} takes {end - begin} bytes in the file, its new value "
                                 f"{len(data)}")
            f.seek(start + begin)
            f.write(data)


def _raw_bytes(tensor) -> bytes:
    """The tensor's bytes as the file stores them (little-endian, row-major), for every dtype (bfloat16 too)."""
    import torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
