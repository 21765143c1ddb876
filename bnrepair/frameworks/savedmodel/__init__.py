"""SavedModel wing: TensorFlow SavedModel folders (TF2 and TF1), run from the saved graph itself.

``graph`` finds BN in the flattened saved graph and rewires it for measuring, ``signature`` chooses what to
feed, ``files`` reads and rewrites the variables checkpoint, ``policy`` refuses graphs that would do more than
compute, ``runner`` measures through the signature, ``export`` writes ONNX through tf2onnx. There is no
in-memory form, and nothing folds: a graph has no layers whose weights could take a BN in.
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions

TITLE = "a TensorFlow SavedModel"
FORMATS = "TensorFlow SavedModels"
READS = ("SavedModel",)
FOLDS_TO: tuple[str, ...] = ()
FOLDER = "a TensorFlow SavedModel (no saved_model.pb)"


def sniff(path: Path, head: bytes, members: list[str] | None) -> bool:
    return path.is_dir() and (path / "saved_model.pb").exists()


def load(path: Path, options: LoadOptions, device: str = "auto"):
    from ..tf_runtime import import_tensorflow, resolve_device
    from .files import read
    from .runner import SavedModelRunner

    device = resolve_device(import_tensorflow(), device)
    return SavedModelRunner(read(Path(path), options), device, options.trust_code)


def claims(model) -> bool:
    """No in-memory model is a SavedModel (so ``wrap`` is never asked for)."""
    return False
