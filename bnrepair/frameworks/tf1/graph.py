"""What a TF1 training graph does not declare and bnrepair must work out: the feeds, the training flag, the
model's input and outputs (``training`` reads what the training side says).

A training graph has no signature: beside the model it holds the loss, the optimizer, the saver and metrics,
fed by placeholders (images, labels, ``is_training``, ``keep_prob``) or an input pipeline. The model's outputs
are the tensors computed from the input alone, through BN, that nothing else computed from the input alone
consumes (the logits or probabilities; the loss needs the labels). Placeholders named by ``--feed`` and the
training flag (the one bool placeholder that steers ``tf.cond``, fed False) become constants, so
``conditionals.resolve`` can cut the training branches away.
"""

from __future__ import annotations

import re

import numpy as np

from ...errors import InputError
from ..savedmodel.policy import SAFE_STATEFUL
from ..tf_graph import FlatGraph, data_inputs, split
from .conditionals import SWITCHES

PLACEHOLDERS = {"Placeholder", "PlaceholderV2", "PlaceholderWithDefault"}
SHAPE_OPS = {"Shape", "ShapeN", "Size", "Rank", "ZerosLike", "OnesLike"}


def parse_feeds(given: tuple[str, ...]) -> dict[str, str]:
    """``("keep_prob=1.0", "is_training=false")`` -> {placeholder node: value text}."""
    feeds = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InputError(f"--feed {item!r}: expected NAME=VALUE (a placeholder and the value to feed it)")
        feeds[split(name.strip())[0]] = value.strip()
    return feeds


def feed_value(text: str, placeholder, origin: str):
    """The numpy value ``text`` stands for, of the dtype and (where fully known) shape ``placeholder`` takes."""
    import tensorflow as tf

    dtype, shape = placeholder.attr["dtype"].type, placeholder.attr["shape"].shape
    np_type = tf.dtypes.as_dtype(dtype).as_numpy_dtype
    try:
        if np_type is np.bool_:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            value = np.array(text.lower() in ("true", "1"))
        elif dtype == tf.string.as_datatype_enum:
            value = np.array(text.encode(), dtype=object)
        else:
            value = np.array(float(text)).astype(np_type)
    except (ValueError, TypeError):
        raise InputError(f"{origin}: --feed value {text!r} is not a {tf.dtypes.as_dtype(dtype).name}") from None
    dims = [d.size for d in shape.dim] if not shape.unknown_rank else None
    return np.full(dims, value) if dims and all(d >= 0 for d in dims) else value


def with_constants(graph_def, values: dict[str, np.ndarray]):
    """``graph_def`` with the placeholders in ``values`` replaced by constants of those values."""
    import tensorflow as tf
    from tensorflow.core.framework import graph_pb2

    out = graph_pb2.GraphDef()
    out.CopyFrom(graph_def)
    for node in out.node:
        if node.name in values:
            value = values[node.name]
            node.op = "Const"
            del node.input[:]
            node.attr.clear()
            node.attr["dtype"].type = tf.dtypes.as_dtype(value.dtype).as_datatype_enum
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    return out


def placeholders(flat: FlatGraph) -> dict[str, object]:
    return {name: node for name, node in flat.nodes.items() if node.op in PLACEHOLDERS}


def steering(flat: FlatGraph, within: set[str] | None = None) -> set[str]:
    """The placeholders that the predicates of ``tf.cond``'s Switches (those in ``within``) depend on."""
    preds = [data_inputs(n)[1] for name, n in flat.nodes.items()
             if n.op in SWITCHES and (within is None or name in within)]
    found = flat.fanin(preds)
    return {name for name in found if flat.nodes[name].op in PLACEHOLDERS}


def training_flag(flat: FlatGraph, fed: set[str], origin: str) -> str | None:
    """The bool placeholder that steers the graph's ``tf.cond``s and is not fed already, or None when there is
    none; several are refused (the user says which with ``--feed``)."""
    bools = sorted(name for name in steering(flat) - fed if flat.nodes[name].attr["dtype"].type == BOOL)
    if len(bools) > 1:
        raise InputError(f"{origin}: several bool placeholders steer tf.cond ({', '.join(bools)}); feed each with "
                         "--feed NAME=true|false (the training flag false)")
    return bools[0] if bools else None


BOOL = 10
"""DataType DT_BOOL"""


class Dataflow:
    """Which nodes depend on the input and which need something bnrepair cannot give (an unfed placeholder, a
    stateful op other than a variable or a random draw), computed forward once over the whole graph."""

    def __init__(self, flat: FlatGraph, input_node: str):
        from tensorflow.python.framework import op_def_registry

        self.flat, self.input_node = flat, input_node
        order = flat.topological(set(flat.nodes))
        self.reaches: set[str] = set()
        self.blocked: set[str] = set()
        self.writers: set[str] = set()
        """ops with side effects (assignments, the saver, queues)"""
        for name in sorted(flat.nodes, key=order.get):
            node = flat.nodes[name]
            if name == input_node:
                self.reaches.add(name)
                continue
            inputs = [split(i)[0] for i in data_inputs(node)]
            definition = op_def_registry.get(node.op)  # variables are among the safe stateful ops
            if definition is None or (definition.is_stateful and node.op not in SAFE_STATEFUL) or any(
                    arg.is_ref for arg in definition.input_arg):  # an op that takes a reference variable writes to it
                self.writers.add(name)
            if node.op == "Placeholder" or name in self.writers or any(i in self.blocked for i in inputs):
                self.blocked.add(name)
            if any(i in self.reaches for i in inputs):
                self.reaches.add(name)

    def settings_needed(self, outputs: list[str]) -> list[str]:
        """The unfed scalar placeholders (``_setting``) through which the graph goes on from ``outputs`` to ops
        that need nothing else: the model's real output lies past them (dropout after the last BN)."""
        needed = set()
        for output in outputs:
            for user, _ in self.flat.users(output):
                if user.name in self.writers:
                    continue
                feeds = {n for n in self.flat.fanin([user.name], stop={self.input_node})
                         if self.flat.nodes[n].op == "Placeholder" and n != self.input_node}
                if feeds and all(_setting(self.flat.nodes[n]) for n in feeds):
                    needed |= feeds
        return sorted(needed)

    def sinks(self) -> list[str]:
        """Nodes computed from the input alone that no other such node consumes, except values made only to be
        written (a moving-average update), shape queries and the stubs that ``tf.gradients`` leaves in its name
        scope (``gradients/zeros_like``)."""
        computable = {n for n in self.reaches if n not in self.blocked}
        consumed = {split(i)[0] for n in computable for i in data_inputs(self.flat.nodes[n])}

        def written(name: str) -> bool:
            users = {node.name for node, _ in self.flat.users(name)}
            return bool(users) and users <= self.writers

        return sorted(n for n in computable - consumed if self.flat.nodes[n].op not in SHAPE_OPS and not written(n)
                      and not any(re.fullmatch(r"gradients(_\d+)?", part) for part in n.split("/")))


def _setting(node) -> bool:
    """A scalar placeholder: a setting such as dropout's keep_prob or a mode string (labels and data are tensors)."""
    shape = node.attr["shape"].shape
    return shape.unknown_rank or not shape.dim
