"""The framework-free picture of a model that every command works on.

Loaders fill it from what the file itself declares (Keras config, torch module tree, ...);
nothing here imports a framework, so diagnosis, reports and folding rules run on plain data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .errors import BnrepairError


@dataclass
class BNLayer:
    """One BatchNorm layer: its identity, its settings and its stored statistics.

    ``var`` is kept in the framework's own convention (``ModelGraph.unbiased_var``).
    ``locations`` says where the statistics live in the file (H5 dataset paths,
    state_dict keys, ...) so writers can patch exactly those values.
    """

    id: str
    channels: int
    axis: int
    eps: float
    momentum: float | None
    center: bool
    scale: bool
    frozen: bool
    mean: np.ndarray
    var: np.ndarray
    locations: dict[str, str] = field(default_factory=dict)
    producer: str | None = None
    producer_kind: str | None = None
    tracks_stats: bool = True
    kind: str = "BatchNormalization"
    separate_from: str | None = None
    """where the graph says so: the moving mean that training updates while inference reads this layer's own,
    never-updated one (a TF1 graph built twice without ``reuse``)"""


@dataclass
class ModelGraph:
    """All BN layers of a model, in forward order, plus what the data stream must produce."""

    framework: str
    source: str
    bn_layers: list[BNLayer]
    input_shape: tuple[int | None, ...] | None = None
    batch: int | None = None
    """the batch size the model's input fixes, where it fixes one (a graph exported with a static batch): eval mode
    then runs every pass at the batches the data gives, joining none"""
    channels_first: bool = False
    unbiased_var: bool = False
    """the framework's variance convention: torch's ``running_var`` is unbiased, Keras's ``moving_variance`` biased"""
    momentum_stored: bool = True
    """False where the checkpoint does not hold the layers' momentum (a torch state_dict: the module ``--arch``
    builds brings its own default, which says nothing about training)"""
    momentum_is_decay: bool = True
    """Keras's momentum is the moving average's decay; torch's is the weight of each new batch (1 - decay)"""
    default_eps: float | None = None
    """the framework's default eps, where it has one (an eps a hundred times off it is worth a word)"""
    frozen_means: str = "trainable=False"
    """what makes a layer ``frozen`` in this framework, as the diagnosis says it"""
    left_alone: list[tuple[str, str]] = field(default_factory=list)
    """BN ops found but not recalibrated, with the reason (an ONNX BN whose statistics are computed)"""
    preprocessing: object | None = None
    """the ``data.preprocess.Declared`` preprocessing the checkpoint declares (a timm or Hugging Face folder)"""

    def decay(self, bn: BNLayer) -> float | None:
        """The moving average's decay whatever the framework's convention; None where the checkpoint does not
        store it."""
        if bn.momentum is None or not self.momentum_stored:
            return None
        return bn.momentum if self.momentum_is_decay else 1.0 - bn.momentum

    def layer(self, layer_id: str) -> BNLayer:
        for bn in self.bn_layers:
            if bn.id == layer_id:
                return bn
        raise KeyError(layer_id)

    def select(self, layers: str | None = None, skip: str | None = None) -> list[BNLayer]:
        """The layers to recalibrate: ``layers`` and ``skip`` are regexes searched in the id. None left is an
        error that names the real reason: no layer keeps statistics, or the options excluded them all."""
        for option, pattern in (("--layers", layers), ("--skip", skip)):
            try:
                re.compile(pattern or "")
            except re.error as exc:
                raise BnrepairError(f"{option} {pattern!r}: not a valid regular expression ({exc})") from None
        chosen = []
        for bn in self.bn_layers:
            if not bn.tracks_stats:
                continue
            if layers and not re.search(layers, bn.id):
                continue
            if skip and re.search(skip, bn.id):
                continue
            chosen.append(bn)
        if not chosen:
            tracking = sum(bn.tracks_stats for bn in self.bn_layers)
            if not tracking:
                raise BnrepairError(f"{self.source}: none of its {len(self.bn_layers)} BN layer(s) keeps running "
                                    "statistics (track_running_stats=False): nothing to recalibrate")
            given = " and ".join(f"{flag} {value!r}" for flag, value in (("--layers", layers), ("--skip", skip))
                                 if value)
            raise BnrepairError(f"{given} leave(s) none of the {tracking} BN layer(s) to recalibrate")
        return chosen
