"""``tf.cond`` in a TF1 graph, resolved for a known training flag: the graph that runs, without Switch / Merge.

TF1 control flow is data flow: ``Switch(data, pred)`` sends ``data`` to output 1 when ``pred`` is true and to
output 0 otherwise, the other output is *dead*, deadness spreads to every op that takes a dead input, and
``Merge`` passes on its one live input. ``tf.layers`` and tf-slim BN with ``training=<placeholder>`` build both
branches (a training-mode BN op and an inference-mode one, or a Merge choosing batch or moving statistics).
Once the flag is a constant this is plain graph rewriting: a Switch with a constant predicate is an edge, a
Merge with one live input is that input, and the dead ops go. BN patterns then read straight from the moving
statistics' variables, and the result runs anywhere a GraphDef runs, ``tf.function`` included.
"""

from __future__ import annotations

from ..tf_graph import FlatGraph, data_inputs, split

SWITCHES = {"Switch", "RefSwitch"}
MERGES = {"Merge", "RefMerge"}


def predicate(flat: FlatGraph, tensor: str) -> bool | None:
    """The value of a Switch's predicate when it is a constant (through identities and ``logical_not``)."""
    node = flat.nodes.get(split(tensor)[0])
    if node is not None and node.op in ("Identity", "LogicalNot") and data_inputs(node):
        inner = predicate(flat, data_inputs(node)[0])
        return None if inner is None else inner != (node.op == "LogicalNot")
    value = flat.const(tensor)
    return bool(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def resolve(graph_def):
    """A copy of ``graph_def`` with every Switch whose predicate is a constant, and every Merge left with one live
    input, replaced by the edge it forwards (a control input on one, by one on the node its data comes from); those
    Switches and Merges, and the ops only the dead side computes, are removed."""
    from tensorflow.core.framework import graph_pb2

    flat = FlatGraph(graph_def)
    order = flat.topological(set(flat.nodes), controls=True)
    alias: dict[tuple[str, int], tuple[str, int]] = {}
    dead_outputs: set[tuple[str, int]] = set()
    dead_nodes: set[str] = set()
    resolved: dict[str, str] = {}
    """a removed Switch or Merge -> the node its live data comes from (which a control input on it waits for)"""

    def live(tensor: str) -> tuple[str, int] | None:
        key = split(tensor)
        key = alias.get(key, key)
        return None if key in dead_outputs or key[0] in dead_nodes else key

    for name in sorted(flat.nodes, key=lambda n: order.get(n, len(order))):
        node = flat.nodes[name]
        controls = [split(i[1:])[0] for i in node.input if i.startswith("^")]
        if any(c in dead_nodes for c in controls):
            dead_nodes.add(name)
            continue
        inputs = [live(i) for i in data_inputs(node)]
        if node.op in MERGES:
            taken = [i for i in inputs if i is not None]
            if not taken:
                dead_nodes.add(name)
            elif len(taken) == 1 and not flat.users(f"{name}:1"):  # nothing asks which input was taken
                alias[(name, 0)] = taken[0]
                resolved[name] = taken[0][0]
            continue
        if any(i is None for i in inputs):
            dead_nodes.add(name)
            continue
        if node.op in SWITCHES:
            value = predicate(flat, data_inputs(node)[1])
            if value is not None:
                alias[(name, int(value))] = inputs[0]
                dead_outputs.add((name, int(not value)))
                resolved[name] = inputs[0][0]

    def rewritten(tensor: str) -> str:
        if tensor.startswith("^"):
            return f"^{resolved.get(tensor[1:], tensor[1:])}"
        node, index = alias.get(split(tensor), split(tensor))
        return node if index == 0 else f"{node}:{index}"

    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.name in dead_nodes or node.name in resolved:
            continue
        new = out.node.add()
        new.CopyFrom(node)
        del new.input[:]
        new.input.extend(rewritten(i) for i in node.input if split(i.lstrip("^"))[0] not in dead_nodes)
    return out
