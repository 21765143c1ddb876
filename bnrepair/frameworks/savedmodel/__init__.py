"""SavedModel wing: TensorFlow SavedModel folders (TF2 and TF1), run from the saved graph itself.

``graph`` flattens the saved graph and finds BN in it, ``checkpoint`` reads and rewrites the variables
checkpoint, ``policy`` refuses graphs that would do more than compute, ``runner`` measures through the
signature. There is no in-memory form and no fold backend.
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions


def load(path: Path, options: LoadOptions, device: str = "auto"):
    from .runner import SavedModelRunner

    return SavedModelRunner(Path(path), options.signature or "serving_default", options.input_name, device,
                            options.trust_code)


def claims(model) -> bool:
    """No in-memory model is a SavedModel (so ``wrap`` is never asked for)."""
    return False
