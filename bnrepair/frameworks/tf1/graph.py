"""What a TF1 training graph does not declare and bnrepair must work out: the feeds, the training flag, the
model's input and outputs, and BN layers whose inference reads variables that training never updates.

A training graph has no signature: beside the model it holds the loss, the optimizer, the saver and metrics,
fed by placeholders (images, labels, ``is_training``, ``keep_prob``) or an input pipeline. The model's outputs
are the tensors computed from the input alone, through BN, that nothing else computed from the input alone
consumes (the logits or probabilities; the loss needs the labels). Placeholders named by ``--feed`` and the
training flag (the one bool placeholder that steers ``tf.cond``, fed False) become constants, so
``conditionals.resolve`` can cut the training branches away.
"""

from __future__ import annotations

import difflib
import re

import numpy as np

from ...errors import InputError
from ..savedmodel.graph import FUSED_OPS, VARIABLE_OPS, FlatGraph, Site, canonical, data_inputs, split
from ..savedmodel.policy import SAFE_STATEFUL
from .conditionals import SWITCHES

PLACEHOLDERS = {"Placeholder", "PlaceholderV2", "PlaceholderWithDefault"}
SHAPE_OPS = {"Shape", "ShapeN", "Size", "Rank", "ZerosLike", "OnesLike"}
ASSIGNS = {"Assign", "AssignSub", "AssignAdd", "AssignVariableOp", "AssignSubVariableOp", "AssignAddVariableOp"}


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
            inputs = [split(i)[0] for i in data_inputs(node)]
            definition = op_def_registry.get(node.op)
            stateful = definition is None or (definition.is_stateful and node.op not in SAFE_STATEFUL) or any(
                arg.is_ref for arg in definition.input_arg)  # an op that takes a reference variable writes to it
            if name == input_node:
                self.reaches.add(name)
                continue
            if stateful and node.op not in VARIABLE_OPS:
                self.writers.add(name)
            if node.op == "Placeholder" or name in self.writers or any(i in self.blocked for i in inputs):
                self.blocked.add(name)
            if any(i in self.reaches for i in inputs):
                self.reaches.add(name)

    def computable(self, name: str) -> bool:
        return name in self.reaches and name not in self.blocked

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


def pruned(graph_def, keep: set[str]):
    """``graph_def`` with the ``keep`` nodes only (inputs from the others dropped: control inputs alone can be),
    without colocation hints, which may name nodes that went."""
    from tensorflow.core.framework import graph_pb2

    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.name in keep:
            new = out.node.add()
            new.CopyFrom(node)
            new.attr.pop("_class", None)
            del new.input[:]
            new.input.extend(i for i in node.input if split(i.lstrip("^"))[0] in keep)
    return out


def updated_by_training(flat: FlatGraph, input_node: str) -> set[str]:
    """The variables some op assigns a value computed from the input (moving averages, not initializers or
    restores)."""
    flow = Dataflow(flat, input_node)
    return {var for name, node in flat.nodes.items() if node.op in ASSIGNS and len(data_inputs(node)) > 1
            and split(data_inputs(node)[1])[0] in flow.reaches
            and (var := flat.variable_of(data_inputs(node)[0])) is not None}


def inference_form(flat: FlatGraph):
    """A copy of the graph in which BN built in training form only (a graph made with ``is_training=True`` as a
    Python bool, as tf-slim's training script saves it) normalises with its moving averages, as the separate
    evaluation graph would: the variables each batch statistic's update op writes. A fused op turns
    ``is_training`` off and reads them; the unfused ``tf.nn.batch_normalization`` reads them in place of the
    batch mean and variance. None when there is no such BN."""
    from tensorflow.core.framework import graph_pb2

    out = graph_pb2.GraphDef()
    out.CopyFrom(flat.graph_def)
    nodes = {n.name: n for n in out.node}
    changed = False
    for name, node in flat.nodes.items():
        if node.op in FUSED_OPS and node.attr["is_training"].b:
            mean, var = (_averaged_into(flat, f"{name}:{i}") for i in (1, 2))
            if mean and var:
                nodes[name].attr["is_training"].b = False
                nodes[name].input[3], nodes[name].input[4] = mean, var
                changed = True
        elif node.op == "Rsqrt":
            changed |= _unfused_inference_form(flat, node, nodes)
    return out if changed else None


def _unfused_inference_form(flat: FlatGraph, rsqrt, nodes: dict) -> bool:
    """``rsqrt(batch_var + eps)`` ... ``batch_mean * inv``: both read the moving averages their updates write."""
    add = flat.nodes.get(split(data_inputs(rsqrt)[0])[0])
    if add is None or add.op not in ("Add", "AddV2"):
        return False
    slots = [(add.name, i) for i, t in enumerate(data_inputs(add)) if flat.const(t) is None]
    var = _averaged_into(flat, data_inputs(add)[slots[0][1]]) if len(slots) == 1 else None
    inv = [rsqrt.name] + [m.name for m, _ in flat.users(rsqrt.name) if m.op == "Mul"]
    means = [((m.name, 1 - i), moving) for name in inv for m, i in flat.users(name) if m.op == "Mul"
             if (moving := _averaged_into(flat, data_inputs(m)[1 - i]))]
    if var is None or len(means) != 1:
        return False
    (slot, mean), = means
    nodes[slots[0][0]].input[slots[0][1]] = var
    nodes[slot[0]].input[slot[1]] = mean
    return True


def _averaged_into(flat: FlatGraph, tensor: str, hops: int = 4) -> str | None:
    """The variable a moving-average update writes from ``tensor`` (within a few ops of it), else None."""
    frontier = [tensor]
    for _ in range(hops):
        reached = []
        for t in frontier:
            for user, _ in flat.users(t):
                if user.op in ASSIGNS:
                    target = flat.variable_of(data_inputs(user)[0])
                    if target is not None and split(data_inputs(user)[0])[0] != split(t)[0]:
                        return target
                reached.append(user.name)
        frontier = reached
    return None


def decays(flat: FlatGraph, variables: set[str]) -> dict[str, float]:
    """Variable -> the decay of the moving average that ``flat`` (the graph in training mode) keeps in it, for the
    update forms of ``tf.layers`` / tf-slim (``AssignSub(v, (v - x) * (1 - decay))``) and of hand-written BN
    (``Assign(v, v * decay + x * (1 - decay))``)."""
    found = {}
    for node in flat.nodes.values():
        if node.op not in ("AssignSub", "Assign") or len(data_inputs(node)) < 2:
            continue
        var = flat.variable_of(data_inputs(node)[0])
        value = flat.nodes.get(split(data_inputs(node)[1])[0])
        if var not in variables or value is None:
            continue
        if node.op == "AssignSub" and value.op == "Mul":
            factor = next((c for i in data_inputs(value) if (c := constant(flat, i)) is not None), None)
            decay = None if factor is None else 1.0 - factor
        elif node.op == "Assign" and value.op in ("Add", "AddV2"):
            terms = [flat.nodes.get(split(i)[0]) for i in data_inputs(value)]
            own = [t for t in terms if t is not None and t.op == "Mul"
                   and any(flat.variable_of(i) == var for i in data_inputs(t))]
            decay = next((c for i in data_inputs(own[0]) if flat.variable_of(i) != var
                          and (c := constant(flat, i)) is not None), None) if own else None
        else:
            continue
        if decay is not None:
            found[var] = round(decay, 6)  # as written in the script (0.999), not float32's 0.99899995
    return found


def constant(flat: FlatGraph, tensor: str) -> float | None:
    """The value of a scalar ``tensor`` computed from constants alone, by running just that (None otherwise)."""
    import tensorflow as tf

    nodes = flat.fanin([tensor])
    if any(flat.nodes[n].op in PLACEHOLDERS | VARIABLE_OPS or flat.nodes[n].op in SWITCHES for n in nodes):
        return None
    graph_def = pruned(flat.graph_def, nodes)
    run = tf.compat.v1.wrap_function(
        lambda: tf.graph_util.import_graph_def(graph_def, return_elements=[canonical(tensor)], name="c"), [])
    value = np.asarray(run()[0])
    return float(value) if value.size == 1 else None


def separate_statistics(sites: dict[str, Site], updated: set[str], keys: dict[str, str],
                        shapes: dict[str, tuple]) -> dict[str, str]:
    """Layer id -> checkpoint key of the moving mean training updates instead of the one the layer reads at
    inference (the missing-``reuse`` bug), for layers whose mean no op updates while others are; the
    counterpart is the updated, unread variable of the same shape whose name is closest."""
    read = {s.mean_var for s in sites.values()} | {s.var_var for s in sites.values()}
    spare = sorted(v for v in updated - read if v in keys)
    found = {}
    for layer_id, site in sites.items():
        if site.mean_var in updated or not spare:
            continue
        same = [v for v in spare if shapes.get(v) == shapes.get(site.mean_var)] or spare
        name = keys.get(site.mean_var, site.mean_var)
        found[layer_id] = keys[max(same, key=lambda v: difflib.SequenceMatcher(None, name, keys[v]).ratio())]
    return found
