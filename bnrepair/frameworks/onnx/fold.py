"""``protocols.Folder`` and ``Exporter`` for ONNX: BN folded backward into the Conv, ConvTranspose (any group), Gemm or
MatMul (+ Add of its bias) that feeds it, in float64; the BN node goes and the folded layer writes its output
tensor (a bias-less MatMul's BN becomes the Add of its shift), so every reader and graph output is unchanged.
Verified in onnxruntime like every fold.

A fold is exact when the producer's output feeds only that BN and its weights are initializers no other
node reads; anything else stays, with the reason (a BN after an activation, a pooling, a shared weight).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...folding import Decision, Folded, Params, axis_index, bn_affine, fold_backward
from ...writers import atomic_path
from .graph import attribute, copied, find_bn, tensor_types
from .values import owned

PRODUCERS = {"Conv", "ConvTranspose", "Gemm"}
"""Nodes that carry their weights (and bias) as inputs; a MatMul (+ Add of a bias) folds too."""


def precise():
    return nullcontext()  # onnxruntime runs float32 as written (the sessions turn TF32 off on CUDA)


def source(model):
    return model


def unfoldable(model) -> None:
    return None


def _params(node, weight: np.ndarray, bias: np.ndarray | None) -> Params | str:
    """The producer's weights with the output channel of each element, or why it cannot take a BN."""
    w = weight.astype(np.float64)
    b = None if bias is None else bias.astype(np.float64)
    if node.op_type == "Conv":
        return Params(w, b, axis_index(w.shape, 0))
    if node.op_type == "ConvTranspose":  # (C_in, C_out / group, k...): output channel g * C_out/group + j
        group = int(attribute(node, "group", 1))
        per_group_in, per_group_out = w.shape[0] // group, w.shape[1]
        out = (axis_index(w.shape, 0) // per_group_in) * per_group_out + axis_index(w.shape, 1)
        return Params(w, b, out)
    if attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0 or attribute(node, "transA", 0):
        return f"{node.name or node.op_type} is a Gemm with alpha, beta or transA set"
    return Params(w, b, axis_index(w.shape, 0 if attribute(node, "transB", 0) else 1))


@dataclass
class Target:
    """Where one BN folds: the weights' node, its bias (its own input, or a following Add), and the node whose
    output becomes the BN's."""

    node: object
    params: Params
    bias: str | None
    last: object | None
    """the producer or its Add; None: a MatMul without bias, whose BN node becomes the Add of its shift"""


def fold(model, bn_ids: set[str], example) -> Folded:
    from onnx import numpy_helper

    folded, _ = owned(model, weights=True)  # scale, bias and weights held in constant subgraphs as values
    folded = copied(model) if folded is model else folded  # the fold rewrites its own copy
    graph = folded.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producers = {out: node for node in graph.node for out in node.output}
    sites, left = find_bn(folded)
    types = tensor_types(folded, [s.x for s in sites])
    decisions, probes, tensors, drop, spent = [], {}, {}, [], set()
    for site in sites:
        if site.id not in bn_ids:
            continue
        bn = graph.node[site.index]
        target = _target(site, bn, producers=producers, readers=readers, outputs=outputs, inits=inits,
                         rank=types[site.x].rank)
        if isinstance(target, str):
            decisions.append(Decision(site.id, reason=target, axis=1))
            continue
        spent.update(bn.input[1:5])  # gamma, beta, mean, var: gone with the BN unless another node reads them
        scale, shift = bn_affine(*(numpy_helper.to_array(inits[n]) for n in (site.mean, site.var)), site.eps,
                                 numpy_helper.to_array(inits[bn.input[1]]), numpy_helper.to_array(inits[bn.input[2]]))
        weight, bias = fold_backward(target.params, scale, shift)
        w_name = target.node.input[1]
        stored = numpy_helper.to_array(inits[w_name])
        inits[w_name].CopyFrom(numpy_helper.from_array(weight.astype(stored.dtype), w_name))
        if target.bias is not None:
            b_name, old = target.bias, numpy_helper.to_array(inits[target.bias])
            inits[b_name].CopyFrom(numpy_helper.from_array(bias.reshape(old.shape).astype(old.dtype), b_name))
        else:
            b_name = f"{bn.name or w_name}/bias"
            new = numpy_helper.from_array(bias.astype(stored.dtype), b_name)
            graph.initializer.append(new)
            inits[b_name] = new
        last = target.last
        if last is None:  # MatMul without a bias: the BN node itself becomes the Add of the folded shift
            bn.op_type, bn.domain = "Add", ""
            del bn.input[:]
            del bn.attribute[:]
            bn.input.extend([site.x, b_name])
            last = bn
        else:
            if target.bias is None:  # a Conv / Gemm that had no bias takes one
                target.node.input.extend([""] * (2 - len(target.node.input)) + [b_name])
            last.output[0] = bn.output[0]  # its readers now read the folded layer
            drop.append(site.index)
        name = last.name or last.output[0]
        decisions.append(Decision(site.id, "backward", [name], axis=1))
        probes[site.id] = [(site.id, None, name)]
        tensors[site.id] = [w_name, b_name]
    decisions += [Decision(layer_id, reason=why, axis=1) for layer_id, why in left]  # every BN kept is named
    for index in sorted(drop, reverse=True):
        del graph.node[index]
    unused = (spent | {n for s in sites for n in (s.mean, s.var)}) - {i for node in graph.node for i in node.input}
    kept = [i for i in graph.initializer if i.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return Folded(folded, decisions, probes, tensors)


def _target(site, bn, *, producers, readers, outputs, inits, rank: int) -> Target | str:
    """Where ``site`` folds, or why it cannot."""
    from onnx import numpy_helper

    def alone(tensor) -> bool:
        return readers.get(tensor, 0) == 1 and tensor not in outputs

    def label(node) -> str:
        return node.name or node.output[0]

    producer = producers.get(site.x)
    if producer is None:
        return "BN reads a graph input, not a conv or dense layer"
    if not alone(site.x):
        return f"the output of {label(producer)} is also used elsewhere"
    if not all(n in inits for n in bn.input[1:3]):
        return "the BN's scale or bias is computed, not stored"
    add, bias = None, None
    if producer.op_type == "Add":
        first, second = producer.input[:2]
        bias = second if second in inits else first if first in inits else None
        matmul = producers.get(first if bias == second else second)
        if bias is None or matmul is None or matmul.op_type != "MatMul" or not alone(matmul.output[0]) \
                or not alone(bias):
            return f"BN follows {label(producer)} (Add), not the bias of a MatMul that feeds it alone"
        add, producer = producer, matmul
    if producer.op_type not in PRODUCERS and producer.op_type != "MatMul":
        return f"BN follows {label(producer)} ({producer.op_type}), not a Conv, ConvTranspose, Gemm or MatMul"
    own_bias = producer.input[2] if producer.op_type != "MatMul" and len(producer.input) > 2 and \
        producer.input[2] else None
    weights = [producer.input[1], *([own_bias] if own_bias else [])]
    if not all(n in inits and readers.get(n, 0) == 1 for n in weights):
        return f"{label(producer)}'s weights are computed or shared with another node"
    w = numpy_helper.to_array(inits[producer.input[1]])
    if producer.op_type == "MatMul":
        if w.ndim != 2 or rank != 2:
            return f"{label(producer)} multiplies rank {rank} by rank {w.ndim}; BN's axis 1 is not its columns"
        b = None if add is None else numpy_helper.to_array(inits[bias]).astype(np.float64).reshape(-1)
        if b is not None and b.size != w.shape[1]:
            return f"{label(add)} adds a bias of {b.size} values to {w.shape[1]} columns"
        return Target(producer, Params(w.astype(np.float64), b, axis_index(w.shape, 1)), bias, add)
    params = _params(producer, w, numpy_helper.to_array(inits[own_bias]) if own_bias else None)
    if isinstance(params, str):
        return params
    return Target(producer, params, own_bias, producer)


_SESSIONS: dict = {}
"""id(model) -> (model, session): the model is kept, so its id cannot be reused while cached"""


def _session(model):
    from ..onnx_runtime import onnx_session

    key = id(model)
    if key not in _SESSIONS:
        while len(_SESSIONS) >= 4:  # the source, the folded model and their capture copies
            _SESSIONS.pop(next(iter(_SESSIONS)))
        _SESSIONS[key] = (model, onnx_session(model.SerializeToString()))
    return _SESSIONS[key][1]


def run(model, x) -> list[np.ndarray]:
    session = _session(model)
    return session.run(None, {session.get_inputs()[0].name: x})


def capture(model, names: set[str], x) -> dict[str, np.ndarray]:
    """The output of each named node (a BN by its id, a folded producer by its name) on ``x``."""
    from onnx import helper

    tensor = {}
    for node in model.graph.node:
        tensor.setdefault(node.name or node.output[0], node.output[0])
    copy = copied(model)
    have = {o.name for o in copy.graph.output}
    wanted = sorted(names)
    for name in wanted:
        if tensor[name] not in have:
            copy.graph.output.append(helper.make_empty_tensor_value_info(tensor[name]))
    session = _session(copy)
    values = session.run([tensor[n] for n in wanted], {session.get_inputs()[0].name: x})
    return dict(zip(wanted, values))


def output_names(model, example) -> list[str]:
    return [o.name for o in model.graph.output]


def save(model, dest: Path, example) -> None:
    with atomic_path(Path(dest)) as tmp:
        tmp.write_bytes(model.SerializeToString())


def to_onnx(model, example, opset: int):
    """The model is ONNX already: itself, in the opset it was written in."""
    return model


def max_opset() -> int:
    import onnx

    return onnx.defs.onnx_opset_version()
