"""PyTorch wing: ``.pt`` checkpoints of every kind and in-memory ``torch.nn.Module``s, run in torch.

``runner`` measures and writes back, ``files`` tells the checkpoint kinds apart and reads and writes them
safely (``tensorfiles``: ``.safetensors``; ``hub``: timm and Hugging Face model folders), ``script``
instruments TorchScript graphs, ``fold`` folds BN in a torch.fx copy and exports.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ...options import LoadOptions

TITLE = "a PyTorch checkpoint"
FORMATS = "PyTorch checkpoints"
READS = (".pt", ".safetensors")
FOLDS_TO = (".pt2",)
ARCHIVE = "a torch checkpoint"
FOLDER = "a timm, Hugging Face or safetensors weights folder (no model.safetensors or its index)"
MISNAMED = ((".pt", ".pth", ".ckpt", ".bin"), "not a PyTorch checkpoint (neither a zip archive nor a pickle)")


def sniff(path: Path, head: bytes, members: list[str] | None) -> bool:
    """A torch zip archive (pickled data or TorchScript code inside), a ``.safetensors`` file, a legacy
    ``torch.save`` pickle, or a folder of safetensors weights (a timm / Hugging Face model folder, or shards)."""
    from .hub import is_weights_folder
    from .tensorfiles import is_safetensors

    if path.is_dir():
        return is_weights_folder(path)
    if members is not None:
        return any(n.endswith("data.pkl") or n.endswith("constants.pkl") or "/code/" in n for n in members)
    return bool(head) and not path.is_dir() and (is_safetensors(path, head) or head[:1] == b"\x80")


def load(path: Path, options: LoadOptions, device: str = "auto"):
    from .runner import load_file

    return load_file(path, options, device)


def claims(model) -> bool:
    return "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module)


def wrap(model, device="auto"):
    from .runner import TorchRunner

    return TorchRunner(model, device=device)
