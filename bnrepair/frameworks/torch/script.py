"""Measuring BN inputs inside a TorchScript module, which forward hooks and Python patching cannot reach.

The module's forward graph is copied and inlined; before each chosen ``aten::batch_norm`` node a two-pass
per-channel reduction of its input is inserted (element count, mean, sum of squared deviations) and
returned as extra outputs of a new function that takes the module as its ``self``. A node that is to
normalise with batch statistics gets no running statistics and ``training=True``, so it normalises with the batch's own
statistics and updates nothing; one in a drift-corrected pass stays an inference node fed ``drift.corrected`` of
the batch's moments, the correction taken as three more inputs of the function. The module itself is never
modified, so it is saved back as it was.
"""

from __future__ import annotations

from collections import Counter

from ...drift import PARTS, Symbol, corrected
from ...errors import InputError


def capture_function(module, train: frozenset, ids: list[str], corrected: frozenset = frozenset()):
    """``(fn, order)``: ``fn(module._c, *inputs, *corrections)`` returns ``(output, count, mean, m2, count, ...)``,
    one (count, mean, m2) per BN call, whose layer ids ``order`` lists; the ``train`` layers normalise with
    batch statistics, the ``corrected`` ones carried by their corrections (offset, then, target per layer, in
    ``order``)."""
    import torch

    graph = _inlined(module)
    wanted, order = set(ids), []
    for node in list(graph.nodes()):  # top-level block only: values inside if/loop bodies cannot be returned
        if node.kind() != "aten::batch_norm":
            continue
        layer_id = _attribute_path(node.inputsAt(3))
        if layer_id in wanted:
            correction = None
            if layer_id in corrected:
                correction = [graph.addInput() for _ in PARTS]
                for value in correction:
                    value.setType(torch._C.TensorType.get())
            for value in _instrument(graph, node, layer_id in train, correction):
                graph.registerOutput(value)
            order.append(layer_id)
    missing = [i for i in ids if i not in order]
    if missing:
        raise InputError(f"TorchScript: BN layer(s) {', '.join(missing)} do not run as aten::batch_norm at the "
                         "top level of the forward graph, so their inputs cannot be measured; leave them out "
                         "with --skip")
    graph.makeMultiOutputIntoTuple()
    return torch._C._create_function_from_graph("bnrepair_capture", graph), order


def call_counts(module, ids) -> dict[str, int]:
    """How many ``aten::batch_norm`` nodes of the inlined forward graph (nested blocks too) read each layer's
    statistics."""
    graph = _inlined(module)  # held: its nodes die with it
    calls = Counter(_attribute_path(node.inputsAt(3)) for node in graph.findAllNodes("aten::batch_norm"))
    return {layer_id: calls.get(layer_id, 0) for layer_id in ids}


def _inlined(module):
    """A copy of the forward graph with submodule calls inlined and the modules' bool flags (``training``,
    torchvision's ``use_res_connect``) as their values now: the ``if`` blocks they steer fold away, so BN
    nodes that ran inside one (``if self.use_res_connect: return x + self.conv(x)``) reach the top level.
    A flag the forward itself assigns stays read at run time."""
    import torch

    graph = module.forward.graph.copy()
    torch._C._jit_pass_inline(graph)
    assigned = {node.s("name") for node in graph.findAllNodes("prim::SetAttr")}
    for node in graph.findAllNodes("prim::GetAttr"):
        names = _names(node.output())
        if names is None or names[-1] in assigned or not isinstance(node.output().type(), torch._C.BoolType):
            continue
        value = module
        for name in names:
            value = getattr(value, name)
        with graph.insert_point_guard(node):
            node.output().replaceAllUsesWith(graph.insertConstant(bool(value)))
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)
    return graph


def _instrument(graph, node, train: bool, correction=None):
    """Insert the reduction of ``node``'s input before it; returns the (count, mean, m2) values."""
    x = node.inputsAt(0)
    with graph.insert_point_guard(node):
        const = graph.insertConstant
        # (N, C, ...) -> (N, C, L) for any rank >= 2, a view for contiguous inputs
        flat = graph.insert("aten::flatten", [graph.insert("aten::unsqueeze", [x, const(-1)]), const(2), const(-1)])
        mean = graph.insert("aten::mean", [flat, const([0, 2]), const(True)])
        centred = graph.insert("aten::sub", [flat, mean])
        m2 = graph.insert("aten::sum", [graph.insert("aten::mul", [centred, centred]), const([0, 2])])
        count = graph.insert("aten::numel", [x])
        if correction is not None:  # drift.corrected, cast to the statistics' dtype
            def emit(op, inputs):
                return graph.insert(f"aten::{op}", inputs)

            stored = node.inputsAt(3)
            var = graph.insert("aten::div", [m2, graph.insert("aten::floordiv", [count, graph.insert(
                "aten::size", [x, const(1)])])])
            mean_c, var_c = corrected(Symbol(graph.insert("aten::reshape", [mean, const([-1])]), emit),
                                      Symbol(var, emit), [Symbol(part, emit) for part in correction],
                                      Symbol(node.inputsAt(7), emit))
            node.replaceInput(3, graph.insert("aten::type_as", [mean_c.value, stored]))
            node.replaceInput(4, graph.insert("aten::type_as", [var_c.value, stored]))
        elif train:
            none = const(None)
            node.replaceInput(3, none)
            node.replaceInput(4, none)
            node.replaceInput(5, const(True))
    return count, mean, m2


def _attribute_path(value) -> str | None:
    """``layer1.0.bn1`` for a value read as ``self.layer1.0.bn1.running_mean``; None for anything else."""
    names = _names(value)
    return ".".join(names[:-1]) if names is not None and len(names) > 1 else None


def _names(value) -> list[str] | None:
    """``["layer1", "0", "bn1", "running_mean"]`` for a value read as ``self.layer1.0.bn1.running_mean``."""
    names = []
    node = value.node()
    while node.kind() == "prim::GetAttr":
        names.append(node.s("name"))
        node = node.input().node()
    return list(reversed(names)) if node.kind() == "prim::Param" and names else None
