"""Folding BatchNorm into neighbouring conv / dense weights: which folds are exact, and the math.

At inference a BN layer is a per-channel affine map ``y = x * scale + shift``. Folded into the layer
before it (backward), every weight feeding output channel ``c`` is multiplied by ``scale[c]`` and the
bias becomes ``bias * scale + shift``. Folded into the layer after it (forward), the weights reading
input channel ``c`` are multiplied by ``scale[c]`` and the bias gains the layer applied to ``shift``;
that is exact only when the consumer sees no padding (a padded border would read ``shift`` as 0) and
mixes all channels (groups 1). Everything is computed in float64; frameworks cast back when writing.

Framework modules describe their graph as ``Op``s (layouts already resolved to plain axes) and their
weights as ``Params`` (index arrays say which channel every weight element belongs to, so grouped,
depthwise and transposed layouts all share the same two formulas).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PRODUCERS = {"conv", "separable", "depthwise", "conv_transpose", "dense"}
"""Layers whose output channels are a linear function of their weights: BN folds backward into them."""
CONSUMERS = {"conv", "dense"}
"""Layers BN may fold forward into (groups 1, no padding)."""
OUTPUT = "<output>"
"""The user name of a tensor that is one of the model's outputs."""


@dataclass
class Op:
    """One layer or operation as the folding rules see it; axes are non-negative."""

    name: str
    kind: str
    """``conv``, ``separable``, ``depthwise``, ``conv_transpose``, ``dense``, ``bn``, ``concat``,
    ``activation``, ``identity`` (the identity at inference: Dropout, drop-path), ``input`` or ``other``"""
    type: str
    inputs: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    calls: int = 1
    channels: int | None = None
    out_axis: int | None = None
    """the axis of its output holding channels (BN, concat: the axis they act on)"""
    in_axis: int | None = None
    """consumers: the axis of their input that they mix"""
    groups: int = 1
    padded: bool = False
    activation: str | None = None
    """an activation the layer applies itself (Keras ``activation=``; a BN-act module's own)"""
    stats: bool = True
    """BN: normalises with stored statistics at inference"""


@dataclass
class Decision:
    """What happens to one BN layer: folded ``how`` into ``into``, or left in place for ``reason``."""

    bn: str
    how: str | None = None
    """``backward``, ``concat`` (backward, split per branch) or ``forward``; None when refused"""
    into: list[str] = field(default_factory=list)
    reason: str = ""
    axis: int | None = None
    """the BN's channel axis"""


@dataclass
class Folded:
    """A framework's folded model, the decisions behind it, and where each fold can be checked."""

    model: Any
    decisions: list[Decision]
    probes: dict[str, list[tuple[str, tuple | None, str]]]
    """per folded BN: (source layer, (axis, start, stop) of its output or None, folded layer) whose
    outputs must agree"""
    tensors: dict[str, list[str]]
    """per folded BN: the names of the weights it went into"""


@dataclass
class Params:
    """A target layer's weights in float64, and the channel every weight element belongs to."""

    weight: np.ndarray
    bias: np.ndarray | None
    out_index: np.ndarray
    in_index: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(self.out_index.max()) + 1


def axis_index(shape, axis: int) -> np.ndarray:
    """``arange`` along ``axis`` of an array of ``shape``, broadcastable to it."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.arange(shape[axis]).reshape(view)


def bn_affine(mean, var, eps: float, gamma=None, beta=None) -> tuple[np.ndarray, np.ndarray]:
    """BN at inference as ``x * scale + shift`` per channel."""
    scale = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    if gamma is not None:
        scale = scale * np.asarray(gamma, np.float64)
    shift = -np.asarray(mean, np.float64) * scale
    if beta is not None:
        shift = shift + np.asarray(beta, np.float64)
    return scale, shift


def fold_backward(p: Params, scale: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``BN(W x + b) = (W * scale) x + (b * scale + shift)``, scale taken per output channel."""
    bias = np.zeros(len(scale)) if p.bias is None else p.bias
    return p.weight * scale[p.out_index], bias * scale + shift


def fold_forward(p: Params, scale: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W (x * scale + shift) + b = (W * scale) x + (b + W shift)``, scale taken per input channel."""
    out = np.broadcast_to(p.out_index, p.weight.shape).ravel()
    gained = np.bincount(out, (p.weight * shift[p.in_index]).ravel(), minlength=p.channels)
    bias = np.zeros(p.channels) if p.bias is None else p.bias
    return p.weight * scale[p.in_index], bias + gained


def apply(decisions: list[Decision], affine: dict, params: dict[str, Params]) -> dict[str, Params]:
    """Fold every accepted decision into ``params`` in order (a layer may take a BN on each side)."""
    for d in decisions:
        if d.how is None:
            continue
        scale, shift = affine[d.bn]
        if d.how == "forward":
            p = params[d.into[0]]
            p.weight, p.bias = fold_forward(p, scale, shift)
            continue
        start = 0
        for name in d.into:
            p = params[name]
            part = slice(start, start + p.channels)
            p.weight, p.bias = fold_backward(p, scale[part], shift[part])
            start += p.channels
    return params


def probes(d: Decision, channels: dict[str, int], accepted: list[Decision]) -> list[tuple[str, tuple | None, str]]:
    """(layer in the source, (axis, start, stop) of its output or None, layer in the folded model) whose
    outputs must be equal. A forward fold's consumer is compared with its own source output, or, where it also
    took a BN backward (the folds compose), with that BN's output."""
    if d.how == "forward":
        behind = [pair for other in accepted if other.how in ("backward", "concat") and d.into[0] in other.into
                  for pair in _backward_pairs(other, channels) if pair[2] == d.into[0]]
        return behind or [(d.into[0], None, d.into[0])]
    return _backward_pairs(d, channels)


def _backward_pairs(d: Decision, channels: dict[str, int]) -> list[tuple[str, tuple | None, str]]:
    if d.how == "backward":
        return [(d.bn, None, d.into[0])]
    pairs, start = [], 0
    for name in d.into:
        pairs.append((d.bn, (d.axis, start, start + channels[name]), name))
        start += channels[name]
    return pairs


def plan(ops: dict[str, Op], bn_names: list[str]) -> list[Decision]:
    """One decision per BN layer: backward when exact, else forward when exact, else refused."""
    decisions = []
    for name in bn_names:
        bn = ops[name]
        if not bn.stats:
            decisions.append(Decision(name, reason="normalises with batch statistics at inference"))
            continue
        if bn.calls > 1:
            decisions.append(Decision(name, reason=f"called {bn.calls} times"))
            continue
        back = _backward(ops, bn)
        if isinstance(back, Decision):
            decisions.append(back)
            continue
        forward = _forward(ops, bn)
        if isinstance(forward, Decision):
            decisions.append(forward)
            continue
        decisions.append(Decision(name, reason=f"{back}; cannot fold forward: {forward}"))
    return decisions


def _producer_problem(ops: dict[str, Op], op: Op, axis: int, only_user: str) -> str | None:
    """Why ``op`` cannot take a BN acting on ``axis`` of its output (None when it can)."""
    if op.activation:
        return f"{op.name} applies activation {op.activation!r} before it"
    if op.calls > 1:
        return f"{op.name} is called {op.calls} times (shared weights)"
    if op.users != [only_user]:
        others = sorted(set(op.users) - {only_user}) or [only_user]
        return f"the output of {op.name} is also used by {', '.join(others)}"
    if op.out_axis != axis:
        return f"BN acts on axis {axis} but {op.name}'s channels are on axis {op.out_axis}"
    return None


def _through_identities(ops: dict[str, Op], name: str, reader: str) -> tuple[Op, str]:
    """The op that feeds ``reader`` once inference identities (Dropout, drop-path) in between are looked
    through, and the name of the op it feeds directly; an identity whose output has other users stops it."""
    src = ops[name]
    while src.kind == "identity" and src.users == [reader] and src.inputs:
        reader, src = src.name, ops[src.inputs[0]]
    return src, reader


def _backward(ops: dict[str, Op], bn: Op) -> Decision | str:
    src, reader = _through_identities(ops, bn.inputs[0], bn.name)
    if src.kind in PRODUCERS:
        problem = _producer_problem(ops, src, bn.out_axis, reader)
        return problem or Decision(bn.name, "backward", [src.name], axis=bn.out_axis)
    if src.kind == "concat":
        problem = _producer_problem(ops, src, bn.out_axis, reader)
        if problem:
            return problem
        for branch in (ops[i] for i in src.inputs):
            if branch.kind not in PRODUCERS:
                return f"concat branch {branch.name} ({branch.type}) is not a conv or dense layer"
            problem = _producer_problem(ops, branch, bn.out_axis, src.name)
            if problem:
                return f"concat branch: {problem}"
        return Decision(bn.name, "concat", list(src.inputs), axis=bn.out_axis)
    if src.kind == "activation":
        before = ops[src.inputs[0]] if src.inputs else None
        if before is not None and before.kind in PRODUCERS:
            return f"activation {src.name} ({src.type}) sits between {before.name} and BN"
        return f"BN follows activation {src.name} ({src.type})"
    if src.kind == "input":
        return "BN reads the model input directly"
    return f"BN follows {src.name} ({src.type}), not a conv or dense layer"


def _forward(ops: dict[str, Op], bn: Op) -> Decision | str:
    if bn.activation:
        return f"it applies {bn.activation} after normalising, before its reader"
    if len(bn.users) != 1 or bn.users[0] == OUTPUT:
        return "its output is a model output" if OUTPUT in bn.users else f"its output has {len(bn.users)} users"
    user = ops[bn.users[0]]
    if user.kind not in CONSUMERS:
        return f"it feeds {user.name} ({user.type}), not a conv or dense layer"
    if user.calls > 1:
        return f"{user.name} is called {user.calls} times (shared weights)"
    if user.groups != 1:
        return f"{user.name} has groups={user.groups}"
    if user.padded:
        return f"{user.name} pads its input (the border would not see the BN shift)"
    if user.in_axis != bn.out_axis:
        return f"BN acts on axis {bn.out_axis} but {user.name} mixes axis {user.in_axis}"
    return Decision(bn.name, "forward", [user.name], axis=bn.out_axis)

