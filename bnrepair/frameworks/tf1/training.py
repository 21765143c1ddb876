"""What the training side of a TF1 graph says about its BN layers: the decay of each moving average, which
statistics training updates (and so which layers read a never-updated set at inference, the missing-``reuse``
bug), and the inference form of BN that the graph holds in training form only.
"""

from __future__ import annotations

import difflib

import numpy as np

from ..savedmodel.graph import FUSED_OPS, Site
from ..tf_graph import VARIABLE_OPS, FlatGraph, canonical, data_inputs, split, subgraph
from .conditionals import SWITCHES
from .graph import PLACEHOLDERS, Dataflow

ASSIGNS = {"Assign", "AssignSub", "AssignAdd", "AssignVariableOp", "AssignSubVariableOp", "AssignAddVariableOp"}


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

    value = flat.const(tensor)
    if value is not None:  # a constant itself: nothing to run
        return float(value) if value.size == 1 else None
    nodes = flat.fanin([tensor])
    if any(flat.nodes[n].op in PLACEHOLDERS | VARIABLE_OPS or flat.nodes[n].op in SWITCHES for n in nodes):
        return None
    graph_def = subgraph(flat, nodes, {})
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
