"""TF1 wing: training checkpoints (``model.ckpt-N.index/.data-*`` with the ``.meta`` saved beside them).

``files`` says which checkpoint a path means and writes the patched copy, ``conditionals`` resolves
``tf.cond`` for a known training flag, ``graph`` finds what a training graph does not declare (feeds, flag,
input, outputs), ``training`` what its training side says (decays, separate inference statistics, the
inference form of training-only BN), ``runner`` measures through the SavedModel wing's machinery.
There is no in-memory form and no fold backend (ONNX export goes through tf2onnx, as for SavedModels).
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions


def load(path: Path, options: LoadOptions, device: str = "auto"):
    from .files import resolve
    from .runner import TF1CheckpointRunner

    return TF1CheckpointRunner(resolve(Path(path), options.step), options.input_name, options.feeds, device,
                               options.trust_code)


def claims(model) -> bool:
    """No in-memory model is a TF1 checkpoint (so ``wrap`` is never asked for)."""
    return False
