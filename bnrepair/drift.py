"""Drift-corrected passes: eval mode's fixed point in a few passes instead of one per BN layer in depth.

The inference fixed point (statistics that inference itself reproduces) is what a train-mode pass with
the whole data set as one batch would measure. Plain inference passes reach it slowly: a correction to
one layer changes the next layer's input only on the following pass, so a network ``n`` BN layers deep
needs about ``n`` passes. A drift-corrected pass lets a correction reach every later layer within one
forward: after a plain pass at statistics ``A`` has recorded each batch's own moments and pooled them
into ``F(A)``, each layer normalises batch ``b`` with ``F(A)`` carried along the way the batch's own
input moved since that pass. The move is read as a per-channel affine map (the batch's std ratio
``r_b = sd_now / sd_then`` and its mean's shift), which is exact wherever the change since that pass
reaches the layer through linear ops alone: mean ``m_b + r_b (F(A)_mean - c_b)``, variance
``r_b^2 F(A)_var`` (``c_b``, ``m_b``: the batch's mean then and now; variances eps-included). The error
left is what the batches' differing responses add (their spread times the step), so a plain pass after
it checks convergence. On the zoo the affine reading takes 7-10 passes where the batch's plain
shift ``F(A) + (m_b - c_b)`` took 9-16 (MobileNetV2 / V3, EfficientNet).

Assumptions: the stream gives the same batches in the same order every pass; each corrected layer is
called once per forward (its moments then belong to one normalisation). Every wing's ``collect`` takes
corrections; the graph-building ones (TorchScript, SavedModel / TF1, ONNX) build ``corrected`` from this one
definition by handing it their own graph values, whose arithmetic adds nodes.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .moments import Moments, relative_change
from .protocols import Runner, Stats, Stream

MEMORY = 1 << 30
"""bytes of per-batch moments a run may keep; beyond that eval mode makes plain passes only"""


PARTS = ("offset", "then", "target")
"""the parts of a correction, in the order ``Drift.corrections`` gives them and ``corrected`` takes them"""


def corrected(mean, var, correction, eps):
    """What a corrected pass normalises a batch with, from the batch's own mean and biased variance and its
    ``correction`` (``Drift.corrections``: the target's mean less the batch's mean then, the batch's and the
    target's eps-included variances then). numpy, torch and TensorFlow values alike, and ``Symbol``s, which
    build it into a graph."""
    offset, then, target = correction
    ratio = (var + eps) / then
    return mean + ratio ** 0.5 * offset, ratio * target - eps


class Symbol:
    """A value of a graph under construction whose arithmetic adds nodes to that graph, so that ``corrected`` of
    symbols builds the correction into a graph wing's graph (TorchScript, a TensorFlow GraphDef, ONNX) from the
    one definition above. ``emit(op, inputs)`` adds one node (``op``: add, sub, mul, div or sqrt; a plain number
    among ``inputs`` is a constant) and returns its output, a value as the wing names one (``value``)."""

    def __init__(self, value, emit):
        self.value, self.emit = value, emit

    def _node(self, op: str, *inputs) -> Symbol:
        return Symbol(self.emit(op, [x.value if isinstance(x, Symbol) else x for x in inputs]), self.emit)

    def __add__(self, other):
        return self._node("add", self, other)

    def __radd__(self, other):
        return self._node("add", other, self)

    def __sub__(self, other):
        return self._node("sub", self, other)

    def __mul__(self, other):
        return self._node("mul", self, other)

    def __rmul__(self, other):
        return self._node("mul", other, self)

    def __truediv__(self, other):
        return self._node("div", self, other)

    def __pow__(self, exponent):
        if exponent != 0.5:
            raise ValueError(f"a Symbol takes square roots only, not ** {exponent}")
        return self._node("sqrt", self)


class Drift:
    """Per-batch moments of the last plain pass, and the corrections they give the next pass."""

    def __init__(self, layers: frozenset[str], eps: dict[str, float]):
        self.layers, self.eps = layers, eps
        self.own: list[dict[str, tuple[np.ndarray, np.ndarray]]] = []
        """each batch's moments (mean, biased variance) in the last plain pass"""
        self.target: Stats = {}
        self.correcting = False
        """whether the pass under way is a corrected one"""
        self.moved = 0.0
        """in a corrected pass: the largest correction yet, in std units (what the normalisation differed by
        from the target statistics); below ``tol`` the pass was as good as a plain one"""

    @classmethod
    def of(cls, runner: Runner, data: Stream, ids: list[str], eps: dict[str, float]) -> Drift | None:
        """None where the assumptions do not hold: eval mode then makes plain passes only."""
        if not getattr(data, "repeatable", False):
            return None
        counts = runner.call_counts()
        if counts is None:
            return None
        layers = frozenset(i for i in ids if counts.get(i) == 1)
        return cls(layers, eps) if layers else None

    def fits(self, reached: list[str], group=None) -> bool:
        """After the first pass: keeps the reached layers; False when their per-batch moments take too much (on
        any rank of ``group``)."""
        self.layers &= frozenset(reached)
        channels = sum(len(self.own[0][i][0]) for i in self.layers if i in self.own[0]) if self.own else 0
        fits = bool(self.layers) and len(self.own) * channels * 16 <= MEMORY
        return fits if group is None else group.every(fits)

    def plan(self, plain_pass_before: bool, stats: Stats) -> bool:
        """A corrected pass follows every plain one; its target is the statistics that plain pass gave. Returns
        whether the pass about to start is a corrected one."""
        self.correcting, self.target, self.moved = plain_pass_before, stats, 0.0
        if not plain_pass_before:
            self.own = []
        return self.correcting

    def collect(self, runner: Runner, inputs, number: int, mode: str, ids: list[str]) -> dict[str, Moments]:
        """Batch ``number``'s moments: measured with its corrections in a corrected pass, else as ``mode`` says."""
        if self.correcting:
            corrections = self.corrections(number)
            moments = runner.collect(inputs, "eval", ids, frozenset(corrections), corrections)
        else:
            moments = runner.collect(inputs, mode, ids)
        self.record(number, moments)
        return moments

    def merge_moved(self, group) -> None:
        """At the end of a corrected pass: the largest correction over every rank of ``group``."""
        if self.correcting:
            self.moved = group.largest(self.moved)

    def corrections(self, number: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if number >= len(self.own):
            raise InputError("the calibration data gave more batches on a later pass than on the one before; "
                             "eval mode needs the same batches every pass")
        own = self.own[number]
        return {i: (self.target[i][0] - own[i][0], own[i][1] + self.eps[i], self.target[i][1] + self.eps[i])
                for i in self.layers if i in own}

    def record(self, number: int, moments: dict[str, Moments]) -> None:
        """Batch ``number``'s moments: kept in a plain pass, compared with the kept ones in a corrected pass."""
        own = {i: (m.mean, m.variance(False)) for i, m in moments.items() if i in self.layers}
        if not self.correcting:
            if number == len(self.own):
                self.own.append(own)
            return
        before = self.own[number]
        self.moved = max([self.moved, *(relative_change(before[i], own[i], self.eps[i]) for i in own if i in before)])
