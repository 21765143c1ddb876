"""TF1 wing: training checkpoints (``model.ckpt-N.index/.data-*`` with the ``.meta`` saved beside them).

``files`` says which checkpoint a path means and writes the patched copy, ``conditionals`` resolves
``tf.cond`` for a known training flag, ``graph`` finds what a training graph does not declare (feeds, flag,
input, outputs), ``training`` what its training side says (decays, separate inference statistics, the
inference form of training-only BN), ``runner`` measures through the SavedModel wing's measuring program.
There is no in-memory form, and nothing folds (ONNX export goes through tf2onnx, as for SavedModels).
"""

from __future__ import annotations

from pathlib import Path

from ...options import LoadOptions

TITLE = "a TF1 training checkpoint"
FORMATS = "TF1 training checkpoints (.meta + .index/.data)"
READS = ("a TF1 checkpoint prefix",)
FOLDS_TO: tuple[str, ...] = ()
FOLDER = "a TF1 model folder (no checkpoint file)"


def sniff(path: Path, head: bytes, members: list[str] | None) -> bool:
    """A checkpoint prefix, one of its files, or a folder with a ``checkpoint`` file (``files.is_checkpoint``)."""
    from .files import is_checkpoint

    return is_checkpoint(path)


def checkpoint_of(path: Path, options: LoadOptions) -> Path:
    """The checkpoint prefix a model folder or checkpoint file stands for (``--step`` choosing)."""
    from .files import resolve

    return resolve(Path(path), options.step)


def load(path: Path, options: LoadOptions, device: str = "auto"):
    from .runner import load as load_checkpoint

    return load_checkpoint(checkpoint_of(path, options), options, device)


def claims(model) -> bool:
    """No in-memory model is a TF1 checkpoint (so ``wrap`` is never asked for)."""
    return False
