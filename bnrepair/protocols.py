"""The written contracts between the framework-free core and the framework wings.

A wing (``frameworks/<name>/``) supplies a ``Runner`` for a model, an ``Exporter`` that writes it as ONNX
and, where the format can be folded, a ``Folder``; the core (recalibration loop, diagnosis, deploy) only ever
talks to these. Data comes in as a ``Stream`` of ``Batch``es, and long loops report to a ``Progress``.
``docs/architecture.md`` shows where each piece lives and how to add a format.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .graph import ModelGraph
from .moments import Moments

Stats = dict[str, tuple[np.ndarray, np.ndarray]]
"""Per BN layer id: (mean, variance), the variance in the framework's own convention."""


@runtime_checkable
class Runner(Protocol):
    """A model bound to its own framework.

    ``infer`` and ``collect`` run everything in inference mode, except that with ``mode="train"`` the BN
    layers normalise with the batch's own statistics (PreciseBN); nothing the model stores changes
    while measuring. ``collect`` returns the moments of each requested BN layer's input, pooled over
    every call the forward pass makes to it.
    """

    framework: str
    graph: ModelGraph
    device: Any
    model: Any
    """the model in its framework (``keras.Model``, ``torch.nn.Module``, ...), for folding and export"""

    def cast_input(self, x: Any) -> Any:
        """A batch as numpy / framework tensors (or a tuple / dict of them), ready for ``infer``."""

    def infer(self, inputs: Any, mode: str = "eval") -> Any:
        """The model's outputs as numpy arrays."""

    def collect(self, inputs: Any, mode: str, ids: list[str], batch_stats: frozenset[str] = frozenset(),
                corrections: dict | None = None) -> dict[str, Moments]:
        """Per-channel moments of the inputs of the BN layers ``ids``, for one batch; the layers in
        ``batch_stats`` normalise with batch statistics in ``eval`` mode too, carried by their
        ``corrections`` where given (``drift.corrected`` of the batch's mean and biased variance)."""

    def set_stats(self, stats: Stats) -> None:
        """Make the model normalise with these statistics at inference (and keep ``graph`` in step)."""

    def save(self, output: Path, changed: list[str]) -> None:
        """Write the input file's format again, with only the ``changed`` layers' statistics replaced."""

    def call_counts(self) -> dict[str, int] | None:
        """Forward calls per BN layer, from the graph alone (no data); None when unknown."""

    # optional: ``free_memory() -> int | None``, the bytes a GPU running the model could still take, which bound
    # eval mode's joined forwards there (``recalibration.joined_size``); without it, the host's memory does

    def weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every weight the model computes with, by name, except the BN moving statistics (what is repaired):
        one that is not finite makes a damaged checkpoint, which no recalibration can mend."""

    def exporter(self) -> Exporter:
        """The format's ONNX export (and the runs that verify it)."""

    def folder(self) -> Folder:
        """The format's folding; an ``InputError`` naming the file where the format folds nothing."""


class Exporter(Protocol):
    """ONNX export for one format, and what verifying a result against the source needs; a wing's module
    (``fold`` where it folds too, ``export`` where it does not) implements it."""

    def precise(self) -> AbstractContextManager:
        """Full float32 arithmetic while verifying (no TF32)."""

    def source(self, model: Any) -> Any:
        """The model as it runs at inference, to compare every result with."""

    def run(self, model: Any, x: np.ndarray) -> list[np.ndarray]:
        """The model's outputs on ``x`` at inference."""

    def output_names(self, model: Any, example: np.ndarray) -> list[str]: ...

    def to_onnx(self, model: Any, example: np.ndarray, opset: int) -> Any:
        """An ``onnx.ModelProto`` of ``model`` with a dynamic batch axis."""

    def max_opset(self) -> int: ...


class Folder(Protocol):
    """Folding BN into its conv / dense neighbour for one framework; each folding wing's ``fold`` module."""

    def unfoldable(self, model: Any) -> str | None:
        """Why ``model`` cannot be folded at all (checked before any work), or None."""

    def fold(self, model: Any, bn_ids: set[str], example: np.ndarray) -> Any:
        """A ``folding.Folded``: a new model with every exactly foldable BN merged, the input untouched."""

    def capture(self, model: Any, names: set[str], x: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs of the named layers on ``x``, copied so later in-place ops cannot change them."""

    def save(self, model: Any, dest: Path, example: np.ndarray) -> None:
        """Write the folded model in the framework's own format, atomically."""


class Batch(Protocol):
    inputs: Any
    labels: np.ndarray | None

    @property
    def size(self) -> int: ...


class Stream(Protocol):
    """Calibration batches; every iteration is one pass over the same samples."""

    origin: str
    seed: int | None
    repeatable: bool
    """whether every pass is known to give the same batches in the same order (a shuffling loader may not)"""
    bad: set[int]
    """indices of samples skipped as undecodable"""

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int:
        """Samples per pass, or 0 while unknown (an iterable not yet read through)."""

    @property
    def has_labels(self) -> bool: ...


class Progress(Protocol):
    """What the recalibration loop tells a progress display."""

    def start_pass(self, index: int, total_samples: int | None, label: str | None = None) -> None:
        """A pass over the data begins; ``label`` names work that is not a recalibration pass (reading)."""

    def advance(self, samples: int) -> None: ...

    def end_pass(self) -> None: ...


class NoProgress:
    """A ``Progress`` that shows nothing."""

    def start_pass(self, index: int, total_samples: int | None, label: str | None = None) -> None: ...

    def advance(self, samples: int) -> None: ...

    def end_pass(self) -> None: ...
