"""PyTorch wing: ``.pt`` checkpoints of every kind and in-memory ``torch.nn.Module``s, run in torch.

``runner`` measures and writes back, ``files`` tells the checkpoint kinds apart and reads and writes them
safely, ``script`` instruments TorchScript graphs, ``fold`` folds BN in a torch.fx copy and exports.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ...options import LoadOptions


def load(path: Path, options: LoadOptions, device: str = "auto"):
    from .runner import load_file

    return load_file(path, options.arch, options.arch_kwargs, options.key, options.trust_pickle,
                     options.trust_code, options.safe_globals, device, options.amp)


def claims(model) -> bool:
    return "torch" in sys.modules and isinstance(model, sys.modules["torch"].nn.Module)


def wrap(model, device="auto"):
    from .runner import TorchRunner

    return TorchRunner(model, device=device)
