"""TensorFlow GraphDefs read as protos, shared by the SavedModel and TF1 wings: tensor names, functions
inlined (``flatten``), lookups over a flat graph (``FlatGraph``), runnable subgraphs and frozen copies.

Nothing here knows BN: the wings find their BN sites with these lookups (``savedmodel/graph.py``).
"""

from __future__ import annotations

from ..errors import InputError

VARIABLE_OPS = {"VarHandleOp", "VariableV2", "Variable"}
PLUMBING = VARIABLE_OPS | {"Identity", "IdentityN", "NoOp", "Placeholder", "Const", "ReadVariableOp"}
# ops that hand a variable's value on unchanged (up to dtype and layout)
PASS_THROUGH = {"Identity", "ReadVariableOp", "Snapshot", "StopGradient", "Cast", "Reshape", "ExpandDims",
                "Squeeze"}



def canonical(tensor: str) -> str:
    """``"node"`` -> ``"node:0"``, the form graph lookups and ``input_map`` take."""
    return tensor if ":" in tensor else f"{tensor}:0"


def split(tensor: str) -> tuple[str, int]:
    """``"node:1"`` -> ``("node", 1)``; ``"node"`` -> ``("node", 0)``."""
    name, _, index = tensor.partition(":")
    return name, int(index) if index else 0


def data_inputs(node) -> list[str]:
    return [i for i in node.input if not i.startswith("^")]


def flatten(meta, fetch_nodes: list[str]):
    """The meta graph with every function call inlined (grappler's function optimizer, nothing else)."""
    from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, rewriter_config_pb2
    from tensorflow.python.grappler import tf_optimizer

    job = meta_graph_pb2.MetaGraphDef()
    job.graph_def.CopyFrom(meta.graph_def)
    job.collection_def["train_op"].node_list.value.extend(fetch_nodes)  # grappler's "fetch" list
    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    rewrite.min_graph_nodes = -1
    rewrite.optimizers.append("function")
    rewrite.function_optimization = rewriter_config_pb2.RewriterConfig.AGGRESSIVE
    return tf_optimizer.OptimizeGraph(config, job)


class FlatGraph:
    """Lookups over a flat GraphDef: nodes by name, consumers, tracing values back to variables."""

    def __init__(self, graph_def):
        self.graph_def = graph_def
        self.nodes = {n.name: n for n in graph_def.node}
        self.consumers: dict[str, list] = {}
        for node in graph_def.node:
            for i, tensor in enumerate(data_inputs(node)):
                self.consumers.setdefault(split(tensor)[0], []).append((node, i, tensor))

    def users(self, tensor: str) -> list:
        """(node, input index) pairs that take ``tensor``, looking through dtype casts."""
        found = []
        for node, index, used in self.consumers.get(split(tensor)[0], []):
            if split(used) != split(tensor):
                continue
            if node.op == "Cast":
                found.extend(self.users(node.name))
            else:
                found.append((node, index))
        return found

    def variable_of(self, tensor: str) -> str | None:
        """The variable node whose value ``tensor`` is (through reads, identities, casts, reshapes)."""
        name, index = split(tensor)
        for _ in range(64):
            node = self.nodes.get(name)
            if node is None:
                return None
            if node.op in VARIABLE_OPS:
                return name
            inputs = data_inputs(node)
            if node.op == "IdentityN" and index < len(inputs):
                name, index = split(inputs[index])
            elif node.op in PASS_THROUGH and inputs:
                name, index = split(inputs[0])
            else:
                return None
        return None

    def const(self, tensor: str):
        """The value of ``tensor`` when it is a constant (through identities), else None."""
        import tensorflow as tf

        name, _ = split(tensor)
        for _ in range(16):
            node = self.nodes.get(name)
            if node is None:
                return None
            if node.op == "Const":
                return tf.make_ndarray(node.attr["value"].tensor)
            if node.op not in ("Identity", "Cast") or not data_inputs(node):
                return None
            name, _ = split(data_inputs(node)[0])
        return None

    def reshape_axis(self, tensor: str) -> int | None:
        """If a moving statistic is reshaped to broadcast (``[1, C, 1, 1]``), the channel axis."""
        name, _ = split(tensor)
        for _ in range(64):
            node = self.nodes.get(name)
            if node is None or node.op in VARIABLE_OPS:
                return None
            if node.op == "Reshape":
                shape = self.const(data_inputs(node)[1])
                if shape is not None and shape.ndim == 1:
                    wide = [i for i, d in enumerate(shape.tolist()) if d != 1]
                    return wide[0] if len(wide) == 1 else None
            inputs = data_inputs(node)
            if not inputs:
                return None
            name, _ = split(inputs[0])
        return None

    def fanin(self, tensors, stop=frozenset()) -> set[str]:
        """Names of the nodes the ``tensors`` depend on through data edges (not looking past ``stop``)."""
        seen: set[str] = set()
        stack = [split(t)[0] for t in tensors]
        while stack:
            name = stack.pop()
            if name in seen or name not in self.nodes:
                continue
            seen.add(name)
            if name not in stop:
                stack.extend(split(i)[0] for i in data_inputs(self.nodes[name]))
        return seen

    def topological(self, keep: set[str], controls: bool = False) -> dict[str, int]:
        """Position of each kept node in a forward (inputs-first) order, control inputs counted with
        ``controls``. A loop's back edge (NextIteration -> Merge) is met while its target is still being
        expanded and is not followed: every node is expanded once, so loops end in bounded time."""
        order: dict[str, int] = {}
        expanding: set[str] = set()
        for start in sorted(keep):
            stack = [(start, False)]
            while stack:
                name, expanded = stack.pop()
                if name in order:
                    continue
                if expanded:
                    order[name] = len(order)
                    continue
                if name in expanding:
                    continue
                expanding.add(name)
                stack.append((name, True))
                inputs = self.nodes[name].input if controls else data_inputs(self.nodes[name])
                stack.extend((split(i.lstrip("^"))[0], False) for i in inputs
                             if split(i.lstrip("^"))[0] in keep and split(i.lstrip("^"))[0] not in order)
        return order

    # --- what the file declares ---------------------------------------------------------------------
    def checkpoint_keys(self) -> dict[str, str]:
        """variable node -> checkpoint key, read off the saver's ``SaveV2`` ops."""
        keys: dict[str, str] = {}
        for node in self.graph_def.node:
            if node.op != "SaveV2":
                continue
            inputs = data_inputs(node)
            names = self.const(inputs[1])
            if names is None:
                continue
            for key, tensor in zip(names.reshape(-1).tolist(), inputs[3:]):
                var = self.variable_of(tensor)
                if var is not None:
                    keys.setdefault(var, key.decode() if isinstance(key, bytes) else str(key))
        return keys


def subgraph(flat: FlatGraph, keep: set[str], placeholders: dict[str, int]):
    """A runnable GraphDef of the ``keep`` nodes; each node in ``placeholders`` becomes a Placeholder of
    that dtype (fed through ``input_map``). Device pins and colocation hints are dropped so the runner's
    device choice applies, and recorded output shapes so that rewired nodes may change them."""
    from tensorflow.core.framework import attr_value_pb2, graph_pb2

    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(flat.graph_def.versions)
    out.library.CopyFrom(flat.graph_def.library)
    for node in flat.graph_def.node:
        if node.name not in keep:
            continue
        if node.name in placeholders:
            new = out.node.add(name=node.name, op="Placeholder")
            new.attr["dtype"].CopyFrom(attr_value_pb2.AttrValue(type=placeholders[node.name]))
            continue
        new = out.node.add()
        new.CopyFrom(node)
        new.device = ""
        new.attr.pop("_class", None)
        new.attr.pop("_output_shapes", None)
        del new.input[:]
        new.input.extend(i for i in node.input if split(i.lstrip("^"))[0] in keep)
    return out


def freeze(graph_def, values: dict):
    """``graph_def`` (from ``subgraph``) with the variable placeholders in ``values`` turned into constants, as
    a converter wants them: a resource variable's reads (``ReadVariableOp``, through any ``Identity`` of its
    handle) become Consts of its value and the handle goes; a reference variable's placeholder becomes the
    Const itself."""
    import tensorflow as tf
    from tensorflow.core.framework import graph_pb2, node_def_pb2

    resource = tf.resource.as_datatype_enum
    nodes = {n.name: n for n in graph_def.node}
    handles = {name: name for name in values if name in nodes and nodes[name].attr["dtype"].type == resource}
    grown = True
    while grown:  # identities of a handle, in whatever order the nodes come
        grown = False
        for node in graph_def.node:
            if node.op == "Identity" and node.name not in handles and split(node.input[0])[0] in handles:
                handles[node.name], grown = handles[split(node.input[0])[0]], True
    used = sorted({handles[split(i.lstrip("^"))[0]] for node in graph_def.node if node.op not in ("ReadVariableOp",)
                   and node.name not in handles for i in node.input if split(i.lstrip("^"))[0] in handles})
    if used:
        raise InputError(f"variable(s) {', '.join(used)} are used other than read (a gather or an update), so "
                         "they cannot be frozen into constants for export")

    def const(name, value):
        node = node_def_pb2.NodeDef(name=name, op="Const")
        node.attr["dtype"].type = tf.dtypes.as_dtype(value.dtype).as_datatype_enum
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
        return node

    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        source = split(node.input[0])[0] if node.op == "ReadVariableOp" and node.input else None
        if source in handles:
            out.node.append(const(node.name, values[handles[source]]))
        elif node.name in values and node.name not in handles:  # a reference variable's value
            out.node.append(const(node.name, values[node.name]))
        elif node.name not in handles:
            out.node.append(node)
    return out
