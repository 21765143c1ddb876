"""A framework-free ``protocols.Runner`` in numpy, so the recalibration loop is tested without any framework.

The model is a chain of BN layers on (N, C) features, ``bn1 -> x * w + b -> relu -> bn2 -> ...`` (two by
default, each link with its own ``w``, ``b``), every statistic in float64. It implements the protocol's modes
exactly: ``train`` normalises each BN with the batch's own statistics, ``eval`` with the stored ones, and
drift corrections as ``collect`` documents them.
"""

from __future__ import annotations

import numpy as np

from bnrepair.drift import corrected
from bnrepair.errors import InputError
from bnrepair.graph import BNLayer, ModelGraph
from bnrepair.moments import Moments

EPS = 1e-3


class ChainRunner:
    framework = "fake"
    device = "cpu"
    model = None

    def __init__(self, channels: int = 3, seed: int = 0, depth: int = 2, counted: bool = True,
                 relu: bool = True):
        """``relu=False``: links are per-channel affine maps only; ``counted=False``: the calls per layer are
        unknown (``call_counts`` None), which leaves eval mode plain passes only."""
        self.relu = relu
        rng = np.random.default_rng(seed)
        self.links = [(rng.normal(1.0, 0.3, channels), rng.normal(0.2, 0.3, channels)) for _ in range(depth - 1)]
        self.w, self.b = self.links[0]
        self.counted = counted
        self.graph = ModelGraph("fake", "chain", [self._layer(f"bn{k + 1}", channels) for k in range(depth)])

    @staticmethod
    def _layer(name: str, channels: int) -> BNLayer:
        return BNLayer(name, channels, 1, EPS, 0.99, True, True, False, np.zeros(channels), np.ones(channels))

    def cast_input(self, x):
        return np.asarray(x, np.float64)

    def _forward(self, x, mode: str, batch_stats=frozenset(), corrections=None):
        seen = {}

        def bn(name, a):
            seen[name] = a
            layer = self.graph.layer(name)
            train = mode == "train" or name in batch_stats
            mean, var = (a.mean(0), a.var(0)) if train else (layer.mean, layer.var)
            if train and name in (corrections or {}):
                mean, var = corrected(mean, var, corrections[name], EPS)
            return (a - mean) / np.sqrt(var + EPS)

        out = bn("bn1", x)
        for k, (w, b) in enumerate(self.links):
            out = out * w + b
            out = bn(f"bn{k + 2}", np.maximum(out, 0.0) if self.relu else out)
        return out, seen

    def infer(self, inputs, mode="eval"):
        return self._forward(inputs, mode)[0]

    def collect(self, inputs, mode, ids, batch_stats=frozenset(), corrections=None):
        seen = self._forward(inputs, mode, batch_stats, corrections)[1]
        return {i: Moments.from_array(seen[i], axis=1) for i in ids}

    def set_stats(self, stats):
        for layer_id, (mean, var) in stats.items():
            layer = self.graph.layer(layer_id)
            layer.mean, layer.var = np.asarray(mean, np.float64), np.asarray(var, np.float64)

    def save(self, output, changed):
        raise InputError("an in-memory model has no file to write")

    def call_counts(self):
        return {bn.id: 1 for bn in self.graph.bn_layers} if self.counted else None

    def weights(self):
        for k, (w, b) in enumerate(self.links):
            yield f"link{k}/w", w
            yield f"link{k}/b", b

    def exporter(self):
        raise InputError("the chain cannot be exported")

    def folder(self):
        raise InputError("the chain cannot be folded")
