"""BatchNormalization nodes in an ONNX graph, and the in-memory rewrites that measure them.

A BN node reads ``X, scale, B, input_mean, input_var`` and normalises over axis 1 (every opset). Its mean and
variance are recalibrated where both are initializers; computed ones (or graph inputs) are reported and left
alone. The measuring copy makes each recalibrated mean / variance a graph input (fed the statistics of the
moment, so passes need no new session), outputs each BN input's per-channel batch moments (a few numbers per
layer come back, not the activations), and, for the layers that normalise with batch statistics, replaces the
node by a BatchNormalization fed those moments, or, in eval mode's drift-corrected passes, those moments carried
by the layer's correction (``drift.corrected``), itself fed as graph inputs ``<tag>/correction_<part>``
(``drift.PARTS``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ...drift import PARTS, Symbol, corrected
from ...errors import InputError

MOMENTS = ("mean", "var", "size")
ONNX_OPS = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "sqrt": "Sqrt"}
"""the ops that ``drift.Symbol``'s arithmetic adds"""
"""what the measuring copy outputs per BN input, as ``<tag>/<moment>``"""


@dataclass(frozen=True)
class Site:
    """One BN node: what it normalises, which initializers hold its statistics, and its attributes."""

    id: str
    index: int
    """position of the node in the graph's node list"""
    x: str
    mean: str
    var: str
    eps: float
    momentum: float
    producer: str | None
    producer_kind: str | None


def attribute(node, name: str, default):
    from onnx import helper

    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def copied(model):
    """A deep copy of a ModelProto, to rewrite without touching the original."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def set_initializers(model, values: dict[str, np.ndarray]) -> None:
    """Replace, in place, the initializers named in ``values`` by those arrays (their dtype as given)."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(np.asarray(values[init.name]), init.name))


def find_bn(model) -> tuple[list[Site], list[tuple[str, str]]]:
    """The recalibratable BN nodes in graph order, and (id, why) for each BN left alone."""
    graph = model.graph
    stored = {init.name for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    readers = Counter(name for node in graph.node for name in node.input if name in stored)
    sites, left, seen = [], [], set()
    for index, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        layer_id = node.name or node.output[0]
        if layer_id in seen:
            layer_id = f"{layer_id}#{index}"
        seen.add(layer_id)
        if attribute(node, "training_mode", 0):
            left.append((layer_id, "runs in training mode (training_mode=1): it keeps no inference statistics"))
            continue
        x, _, _, mean, var = node.input[:5]
        if mean not in stored or var not in stored:
            copies = [producers[t].input[0] for t in (mean, var) if t not in stored and t in producers
                      and producers[t].op_type == "Identity" and readers[producers[t].input[0]] > 1]
            left.append((layer_id, f"its mean / variance are copies of initializer(s) {', '.join(copies)}, which other "
                                   "nodes read too (torch's exporter merges equal tensors, such as a freshly "
                                   "initialised BN's statistics and its bias / weight)" if copies else
                         "its mean / variance are computed in the graph, not stored"))
            continue
        producer = producers.get(x)
        sites.append(Site(id=layer_id, index=index, x=x, mean=mean, var=var,
                          eps=float(attribute(node, "epsilon", 1e-5)), momentum=float(attribute(node, "momentum", 0.9)),
                          producer=producer.name if producer is not None else None,
                          producer_kind=producer.op_type if producer is not None else None))
    return sites, left


def tag(site: Site) -> str:
    """The prefix of the tensors bnrepair adds for ``site``: ``<tag>/mean``, ``<tag>/var``, ``<tag>/size``."""
    return f"bnrepair/{site.id}"


def measuring_copy(model, sites: list[Site], batch_stats: frozenset, types: dict[str, TensorType],
                   corrected: frozenset = frozenset()):
    """A copy of ``model`` that takes each site's statistics as graph inputs, outputs each BN input's batch
    mean, biased variance (over every axis but 1, two-pass within the batch) and element count after the
    model's own outputs, and normalises the ``batch_stats`` sites with those batch statistics (carried by their
    corrections where ``corrected``)."""
    from onnx import helper

    copy = copied(model)
    graph = copy.graph
    fed = {name for site in sites for name in (site.mean, site.var)}
    kept = [init for init in graph.initializer if init.name not in fed]
    declared = {init.name: (init.data_type, list(init.dims)) for init in graph.initializer if init.name in fed}
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for name in sorted(fed):
        graph.input.append(helper.make_tensor_value_info(name, *declared[name]))
    opset = next((o.version for o in copy.opset_import if o.domain in ("", "ai.onnx")), 13)
    for site in sorted(sites, key=lambda s: -s.index):  # from the back, so earlier indices stay valid
        node = graph.node[site.index]
        added = _moments(site, types[site.x], opset)
        if site.id in corrected:
            nodes, inputs, moments = _corrected(site, types[site.x])
            added += nodes + _batch_normalised(node, site, types[site.x], moments)
            graph.input.extend(inputs)
            del graph.node[site.index]
        elif site.id in batch_stats:
            added += _batch_normalised(node, site, types[site.x])
            del graph.node[site.index]
        for offset, new in enumerate(added):
            graph.node.insert(site.index + offset, new)
        for stat in MOMENTS:
            graph.output.append(helper.make_empty_tensor_value_info(f"{tag(site)}/{stat}"))
    return copy


def fanin(model, tensors: list[str], reads=None) -> tuple[set[int], set[str]]:
    """The nodes (indices) that ``tensors`` are computed by, and the graph inputs they read; a node's subgraphs
    (If / Loop / Scan bodies) count with the outer names they read. ``reads(node)``: the names of a node to follow
    [default: all it reads, ``outer_names``]."""
    reads = reads or outer_names
    producers = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    inputs = {i.name for i in model.graph.input}
    nodes, read, todo = set(), set(), list(tensors)
    while todo:
        name = todo.pop()
        if name in inputs:
            read.add(name)
        if name not in producers or producers[name] in nodes:
            continue
        nodes.add(producers[name])
        todo.extend(reads(model.graph.node[producers[name]]))
    return nodes, read


def outer_names(node) -> list[str]:
    """What ``node`` reads: its inputs, and the names its subgraphs read from the graph around them."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for body in [attr.g] if attr.HasField("g") else list(attr.graphs):
            inner = {o for n in body.node for o in n.output} | {i.name for i in body.input} | \
                    {i.name for i in body.initializer}
            names += [n for sub in body.node for n in outer_names(sub) if n not in inner]
    return names


def pruned(model, outputs: list[str]):
    """``model`` computing only ``outputs``: the nodes and graph inputs they do not need are dropped (a graph
    input onnxruntime would otherwise insist on being fed)."""
    from onnx import helper

    nodes, read = fanin(model, outputs)
    copy = copied(model)
    graph = copy.graph
    declared = {o.name: o for o in graph.output}
    kept = [node for i, node in enumerate(graph.node) if i in nodes]
    inputs = [i for i in graph.input if i.name in read]
    del graph.node[:], graph.input[:], graph.output[:]
    graph.node.extend(kept)
    graph.input.extend(inputs)
    graph.output.extend(declared.get(name) or helper.make_empty_tensor_value_info(name) for name in outputs)
    return copy


def _constant(name: str, values, dtype=None, dims=None):
    from onnx import TensorProto, helper

    dtype = TensorProto.INT64 if dtype is None else dtype
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        f"{name}_value", dtype, [len(values)] if dims is None else dims, values))


WIDE = {1, 11}
"""float32 and float64: moments of anything narrower (float16, bfloat16) are taken in float32"""


def moment_type(x: TensorType) -> int:
    """The onnx type the batch moments of an input of type ``x`` are taken in (and its correction fed in)."""
    from onnx import TensorProto

    return x.elem_type if x.elem_type in WIDE else TensorProto.FLOAT


def _moments(site: Site, x: TensorType, opset: int) -> list:
    """The batch's mean and biased variance of ``site.x`` over every axis but 1 (kept as singletons; in float32
    at least), and its element count."""
    from onnx import TensorProto, helper

    if x.rank < 2:
        raise InputError(f"BN {site.id}: its input has rank {x.rank}; BatchNormalization needs at least 2")
    t, axes = tag(site), [0, *range(2, x.rank)]
    source = site.x if x.elem_type in WIDE else f"{t}/wide"

    def reduce(op_input, out):
        if opset >= 18:
            return helper.make_node("ReduceMean", [op_input, f"{t}/axes"], [out], keepdims=1)
        return helper.make_node("ReduceMean", [op_input], [out], axes=axes, keepdims=1)

    return [*([_constant(f"{t}/axes", axes)] if opset >= 18 else []),
            *([] if source == site.x else [helper.make_node("Cast", [site.x], [source], to=TensorProto.FLOAT)]),
            reduce(source, f"{t}/mean"),
            helper.make_node("Sub", [source, f"{t}/mean"], [f"{t}/centred"]),
            helper.make_node("Mul", [f"{t}/centred", f"{t}/centred"], [f"{t}/squared"]),
            reduce(f"{t}/squared", f"{t}/var"),
            helper.make_node("Size", [site.x], [f"{t}/size"])]


def _corrected(site: Site, x: TensorType) -> tuple[list, list, tuple[str, str]]:
    """Nodes computing ``drift.corrected`` of the batch's moments (shaped as ``_moments`` keeps them), the graph
    inputs of the correction they read, and the names of the corrected mean and variance."""
    from onnx import helper

    t, dtype = tag(site), moment_type(x)
    inputs = [helper.make_tensor_value_info(f"{t}/correction_{part}", dtype, [None]) for part in PARTS]
    nodes = [_constant(f"{t}/channels", [1, -1] + [1] * (x.rank - 2)),
             helper.make_node("Constant", [], [f"{t}/eps"], value=helper.make_tensor(f"{t}/eps_value", dtype, [],
                                                                                    [site.eps]))]
    for part in PARTS:
        nodes.append(helper.make_node("Reshape", [f"{t}/correction_{part}", f"{t}/channels"], [f"{t}/{part}"]))

    def emit(op, inputs):
        nodes.append(helper.make_node(ONNX_OPS[op], inputs, [f"{t}/corrected_{len(nodes)}"]))
        return nodes[-1].output[0]

    mean, var = corrected(Symbol(f"{t}/mean", emit), Symbol(f"{t}/var", emit),
                          [Symbol(f"{t}/{part}", emit) for part in PARTS], Symbol(f"{t}/eps", emit))
    return nodes, inputs, (mean.value, var.value)


def _batch_normalised(node, site: Site, x: TensorType, moments: tuple[str, str] | None = None) -> list:
    """``node`` itself, fed the batch statistics ``_moments`` computes (or the ``moments`` named, ``_corrected``'s)
    flattened to one value per channel, in the input's type, in place of the stored ones: onnxruntime's own
    BatchNormalization kernel normalises."""
    from onnx import helper

    t = tag(site)
    fed = helper.make_node("BatchNormalization", [site.x, node.input[1], node.input[2], f"{t}/mean_c", f"{t}/var_c"],
                           [node.output[0]], name=node.name, epsilon=site.eps)
    nodes = [_constant(f"{t}/flat", [-1])]
    for stat, value in zip(("mean", "var"), moments or (f"{t}/mean", f"{t}/var")):
        flat = f"{t}/{stat}_flat" if x.elem_type not in WIDE else f"{t}/{stat}_c"
        nodes.append(helper.make_node("Reshape", [value, f"{t}/flat"], [flat]))
        if x.elem_type not in WIDE:
            nodes.append(helper.make_node("Cast", [flat], [f"{t}/{stat}_c"], to=x.elem_type))
    return [*nodes, fed]


@dataclass(frozen=True)
class TensorType:
    rank: int
    elem_type: int
    """onnx.TensorProto data type"""


def tensor_types(model, tensors: list[str]) -> dict[str, TensorType]:
    """The rank and element type of each of ``tensors``, from onnx's shape inference (the graph inputs'
    declared shapes)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: TensorType(len(v.type.tensor_type.shape.dim), v.type.tensor_type.elem_type)
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
             if v.type.tensor_type.HasField("shape")}
    missing = [t for t in tensors if t not in known]
    if missing:
        raise InputError(f"the rank of BN input(s) {', '.join(missing)} is unknown to onnx's shape inference")
    return {t: known[t] for t in tensors}


def array(model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))
