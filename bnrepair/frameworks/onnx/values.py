"""Values that an ONNX graph computes from constants alone, made initializers of the nodes bnrepair changes.

Exporters keep a BN's statistics, its affine parameters and its producer's weights in more ways than plain
initializers: paddle2onnx in ``Constant`` nodes; torch's exporter with constant folding off as ``Transpose`` of an
initializer, and its legacy exporter as ``Identity`` copies of one initializer that several nodes read (it merges
equal tensors: a fresh BN's mean 0 with a bias of zeros). Recalibration needs each BN's mean and variance as
tensors that this BN alone reads, folding needs the values of its affine parameters and of its producer's weights.

``owned`` evaluates each such input whose fan-in reads no graph input with onnx's own reference evaluator and
stores it as a new initializer read by that node alone; the nodes and initializers that nothing reads any more
go. Every other node, and every input that already was an initializer of its own, stays as it was. A
recalibrated file so changes only where the statistics are kept; a folded one where the fold writes anyway.
(onnx's reference evaluator over onnxsim / onnxslim: it ships with onnx, which bnrepair needs anyway, and it
evaluates exactly the nodes asked for, where a whole-graph simplifier would rewrite the user's graph.)
"""

from __future__ import annotations

from collections import Counter

from .graph import copied, fanin, outer_names

STATISTICS = (3, 4)
"""a BatchNormalization's mean and variance inputs: written back, so they must be this node's own"""
PARAMETERS = (1, 2)
"""its scale and bias: read only"""
PRODUCERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}
"""the nodes a BN folds into, whose weights folding rewrites"""


def owned(model, weights: bool = False) -> tuple[object, list[str]]:
    """A copy of ``model`` in which every BN's statistics are initializers it alone reads, and with ``weights``
    (folding) its parameters and its producers' weights too wherever constants compute them; with the
    initializers made so (``model`` itself where there is nothing to make). Computed values are resolved first,
    so an initializer that only copies of it shared stays its reader's."""
    from onnx import numpy_helper

    stored = {init.name for init in model.graph.initializer}
    readers = Counter(name for node in model.graph.node for name in node.input)
    if all(node.input[i] in stored and not (own and readers[node.input[i]] > 1)
           for node, i, own in _wanted(model.graph) if weights or own):
        return model, []  # the common case: nothing to resolve, and no copy of a model that may be large
    model = copied(model)
    graph = model.graph
    names = {name for node in graph.node for name in (*node.input, *node.output)}
    names |= {init.name for init in graph.initializer}
    wanted, made = [w for w in _wanted(graph) if weights or w[2]], []

    def store(owner, index: int, value) -> None:
        fresh = _unique(f"{owner.name or owner.output[0]}/{owner.input[index]}", names)
        graph.initializer.append(numpy_helper.from_array(value, fresh))
        owner.input[index] = fresh
        made.append(fresh)

    computed, types = set(), _element_types(model)
    for owner, index, _ in wanted:
        name = owner.input[index]
        if name not in stored and (value := _constant(model, name, types)) is not None:
            computed.add(name)
            store(owner, index, value)
    _drop_unread(model, computed)
    readers = Counter(name for node in graph.node for name in node.input)
    arrays = {init.name: init for init in graph.initializer}
    for owner, index, own in wanted:
        name = owner.input[index]
        if own and name in arrays and readers[name] > 1:  # shared: this BN takes a copy, the last reader keeps it
            store(owner, index, numpy_helper.to_array(arrays[name]))
            readers[name] -= 1
    return model, made


def _wanted(graph) -> list[tuple[object, int, bool]]:
    """(node, input index, must be its own) for every BN's parameters and statistics and its producers' weights."""
    producers = {out: node for node in graph.node for out in node.output}
    wanted = []
    for node in graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        wanted += [(node, i, i in STATISTICS) for i in (*PARAMETERS, *STATISTICS)]
        producer = producers.get(node.input[0])
        for _ in range(2):  # the producer, and a MatMul behind a bias Add
            if producer is None or producer.op_type not in PRODUCERS:
                break
            wanted += [(producer, i, False) for i in range(1, len(producer.input)) if producer.input[i]]
            producer = producers.get(producer.input[0]) if producer.op_type == "Add" else None
    return wanted


def _constant(model, name: str, types):
    """The value of tensor ``name`` where constants alone compute it (onnx's reference evaluator runs the nodes
    it comes from), else None. ``CastLike``'s second input is read for its type alone (torch's dynamo exporter
    casts its constants like the tensor they meet): it runs as a ``Cast`` to that type, one of ``types()``."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    chosen, inputs = fanin(model, [name], reads=_valued)
    if inputs or not chosen:
        return None
    nodes = []
    for node in (graph.node[i] for i in sorted(chosen)):
        if node.op_type == "CastLike":
            if node.input[1] not in types():
                return None
            node = helper.make_node("Cast", node.input[:1], node.output, to=types()[node.input[1]])
        nodes.append(node)
    read = {n for node in nodes for n in node.input}
    body = helper.make_graph(nodes, "constant", [], [helper.make_empty_tensor_value_info(name)],
                             [init for init in graph.initializer if init.name in read])
    sub = helper.make_model(body, opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        return ReferenceEvaluator(sub).run(None, {})[0]
    except Exception:  # an op the evaluator lacks: left as it is, and reported where it matters
        return None


def _valued(node) -> list[str]:
    """The names whose values ``node`` computes from: all it reads, but ``CastLike``'s second input (its type)."""
    return node.input[:1] if node.op_type == "CastLike" else outer_names(node)


def _element_types(model):
    """A function giving each tensor's element type from onnx's type inference, run once when first asked."""
    import onnx

    known: dict[str, int] = {}

    def types() -> dict[str, int]:
        if not known:
            inferred = onnx.shape_inference.infer_shapes(model).graph
            known.update({v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input,
                                                                         *inferred.output)})
            known.update({init.name: init.data_type for init in inferred.initializer})
        return known

    return types


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}#{n}"
    taken.add(candidate)
    return candidate


def _drop_unread(model, names: set[str]) -> None:
    """Remove the nodes that computed ``names`` and the initializers they read, where nothing reads them any
    more; a graph output is always read."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    todo, freed = set(names), set(names)
    while todo:
        read = {n for node in graph.node for n in node.input} | outputs
        dead = [node for node in graph.node if set(node.output) & todo and not set(node.output) & read]
        todo = set()
        for node in dead:
            graph.node.remove(node)
            todo.update(n for n in node.input if n)
        freed |= todo
    read = {n for node in graph.node for n in node.input} | outputs
    kept = [init for init in graph.initializer if init.name in read or init.name not in freed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
