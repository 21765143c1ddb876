"""A SavedModel's own graph, read as protos: the signature, its functions inlined, its BN sites.

The graph analysed is the one the SavedModel stores for serving (what TF Serving runs), so no Python
code of the model is needed. TF2 SavedModels keep the model in nested functions; grappler's function
inliner flattens them into one GraphDef. The saver's ``SaveV2`` ops then say under which checkpoint
key each variable node is stored, and BN sites are recognised by op pattern: ``FusedBatchNorm*`` in
inference mode, or the unfused ``x * (rsqrt(variance + eps) * gamma) + (beta - mean * ...)`` of
``tf.nn.batch_normalization`` (Keras 3, and Keras 2 on non-4D inputs), both with moving statistics
read from variables.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...drift import PARTS
from ...errors import InputError

VARIABLE_OPS = {"VarHandleOp", "VariableV2", "Variable"}
FUSED_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}
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


@dataclass
class Signature:
    name: str
    inputs: dict[str, str]
    """signature input name -> tensor name"""
    dtypes: dict[str, int]
    """signature input name -> DataType enum"""
    outputs: dict[str, str]
    input_name: str | None
    """the input the calibration data feeds; None until the BN layers say which (several inputs, no --input)"""
    shape: tuple[int | None, ...] | None
    """the shape of that input, batch dimension included"""

    @property
    def input_tensor(self) -> str:
        return self.inputs[self.input_name]


@dataclass
class Site:
    """One BN op in the flat graph: what it normalises and which variables hold its statistics."""

    node: str
    fused: bool
    x: str
    mean_var: str
    var_var: str
    eps: float
    axis: int
    """channel axis of ``x`` (negative: counted from the end)"""
    gamma_var: str | None = None
    beta_var: str | None = None
    mean_slot: tuple[str, int] | None = None
    var_slot: tuple[str, int] | None = None
    """unfused: the (node, input index) that takes the moving mean / variance (rewired in train mode)"""
    producer: tuple[str, str] | None = None


def read_meta_graph(path: Path):
    """The serving MetaGraphDef of the SavedModel at ``path``."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    model = saved_model_pb2.SavedModel()
    try:
        model.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    except (DecodeError, OSError) as exc:
        raise InputError(f"{path}: saved_model.pb cannot be read ({exc})") from None
    graphs = list(model.meta_graphs)
    for wanted in (lambda tags: tags == {"serve"}, lambda tags: "serve" in tags, lambda tags: len(graphs) == 1):
        for meta in graphs:
            if wanted(set(meta.meta_info_def.tags)):
                return meta
    found = "; ".join(",".join(m.meta_info_def.tags) for m in graphs) or "none"
    raise InputError(f"{path}: no meta graph tagged 'serve' (tag sets found: {found})")


def choose_signature(meta, name: str, input_name: str | None, origin: str) -> Signature:
    user = {k: v for k, v in meta.signature_def.items() if not k.startswith("__")}
    if name not in user:
        raise InputError(f"{origin}: no signature {name!r}; the SavedModel has: {', '.join(sorted(user)) or 'none'} "
                         "(choose with --signature)")
    sig = meta.signature_def[name]
    inputs = {k: v.name for k, v in sig.inputs.items()}
    if input_name is None and len(inputs) == 1:
        input_name = next(iter(inputs))
    if input_name is None:
        return Signature(name, inputs, {k: v.dtype for k, v in sig.inputs.items()},
                         {k: v.name for k, v in sig.outputs.items()}, None, None)
    if input_name not in inputs:
        raise InputError(f"{origin}: signature {name!r} has no input {input_name!r}; "
                         f"its inputs: {', '.join(sorted(inputs))}")
    info = sig.inputs[input_name]
    shape = None
    if not info.tensor_shape.unknown_rank:
        shape = tuple(None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
    return Signature(name, inputs, {k: v.dtype for k, v in sig.inputs.items()},
                     {k: v.name for k, v in sig.outputs.items()}, input_name, shape)


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

    def find_bn(self, keep: set[str]) -> tuple[list[Site], list[str]]:
        """BN sites among ``keep``, in forward order, and one line per candidate that was not one."""
        sites, rejected = [], []
        order = self.topological(keep)
        for name in sorted(keep, key=order.get):
            node = self.nodes[name]
            if node.op in FUSED_OPS:
                found = self._fused(node)
            elif node.op == "Rsqrt":
                found = self._unfused(node)
            else:
                continue
            if isinstance(found, str):
                rejected.append(found)
            else:
                found.producer = self._producer(found.x)
                sites.append(found)
        # the BN input's position, not the op's: an unfused site's Rsqrt depends on variables only
        return sorted(sites, key=lambda s: order[split(s.x)[0]]), rejected

    def _fused(self, node) -> Site | str:
        if node.attr["is_training"].b:
            return f"{node.op} {node.name} normalises with batch statistics (is_training=True)"
        x, scale, offset, mean, var = data_inputs(node)[:5]
        mean_var, var_var = self.variable_of(mean), self.variable_of(var)
        if mean_var is None or var_var is None:
            return f"{node.op} {node.name} takes its mean/variance from constants or computations, not variables"
        return Site(node.name, True, x, mean_var, var_var, float(node.attr["epsilon"].f),
                    1 if node.attr["data_format"].s.decode().startswith("NC") else -1,
                    gamma_var=self.variable_of(scale), beta_var=self.variable_of(offset))

    def _unfused(self, rsqrt) -> Site | str:
        """``tf.nn.batch_normalization``: inv = rsqrt(var + eps) [* gamma]; x * inv + (beta - mean * inv)."""
        where = f"Rsqrt {rsqrt.name}"
        add = self.nodes.get(split(data_inputs(rsqrt)[0])[0])
        if add is None or add.op not in ("Add", "AddV2"):
            return f"{where} is not rsqrt(variance + epsilon)"
        a, b = data_inputs(add)[:2]
        eps, var_in, var_index = (self.const(b), a, 0) if self.const(b) is not None else (self.const(a), b, 1)
        var_var = self.variable_of(var_in)
        if eps is None or eps.size != 1 or var_var is None:
            return f"{where}: its variance is not a stored variable plus a constant epsilon (batch statistics?)"
        inv, gamma = rsqrt.name, None
        muls = [(m, i) for m, i in self.users(inv) if m.op == "Mul"]
        if len(muls) == 1 and self.variable_of(data_inputs(muls[0][0])[1 - muls[0][1]]):
            scale_mul = muls[0][0]
            gamma = self.variable_of(data_inputs(scale_mul)[1 - muls[0][1]])
            inv = scale_mul.name
            muls = [(m, i) for m, i in self.users(inv) if m.op == "Mul"]
        mean_side, x_side = [], []
        for mul, index in muls:
            other_index = 1 - index
            other = data_inputs(mul)[other_index]
            slot = (mul.name, other_index)
            source = self.nodes.get(split(other)[0])
            if source is not None and source.op == "Neg":  # center=False: -mean * inv
                slot, other = (source.name, 0), data_inputs(source)[0]
            (mean_side if self.variable_of(other) else x_side).append((slot, other))
        if len(mean_side) != 1 or len(x_side) != 1:
            return f"{where} does not feed exactly one x * inv and one mean * inv"
        (mean_slot, mean_in), (_, x) = mean_side[0], x_side[0]
        beta = self._beta(mean_slot[0]) if self.nodes[mean_slot[0]].op == "Mul" else None
        axis = self.reshape_axis(mean_in)
        return Site(rsqrt.name, False, x, self.variable_of(mean_in), var_var, float(eps.reshape(-1)[0]),
                    -1 if axis is None else axis, gamma_var=gamma, beta_var=beta, mean_slot=mean_slot,
                    var_slot=(add.name, var_index))

    def _beta(self, mean_mul: str) -> str | None:
        """beta in ``beta - mean * inv``, when there is one."""
        for user, index in self.users(mean_mul):
            if user.op == "Sub" and index == 1:
                return self.variable_of(data_inputs(user)[0])
        return None

    def _producer(self, tensor: str) -> tuple[str, str]:
        name, index = split(tensor)
        node = self.nodes[name]
        while node.op in ("Identity", "IdentityN") and data_inputs(node):
            name, index = split(data_inputs(node)[index if node.op == "IdentityN" else 0])
            node = self.nodes[name]
        return node.name, node.op


def no_bn_message(graph: FlatGraph, keep: set[str], rejected: list[str], where: str) -> str:
    """One line that says what the graph (``where``: "signature 'serving_default'") holds instead of
    recognisable BN layers."""
    if rejected:
        shown = "; ".join(rejected[:3]) + (f"; and {len(rejected) - 3} more" if len(rejected) > 3 else "")
        return f"cannot identify BatchNorm layers in {where}: {shown}"
    ops = Counter(graph.nodes[n].op for n in keep if graph.nodes[n].op not in PLUMBING)
    common = ", ".join(f"{op} x{count}" for op, count in ops.most_common(8)) or "none"
    return (f"cannot identify BatchNorm layers in {where}: no FusedBatchNorm op and no "
            f"rsqrt(moving_variance + eps) pattern among its {len(keep)} ops (computing ops: {common})")


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


def correction_inputs(site: Site) -> list[str]:
    """The float32 placeholders a corrected site reads its correction from (``rewire_for_batch_statistics``)."""
    return [f"{site.node}/bnrepair/correction_{part}" for part in PARTS]


def rewire_for_batch_statistics(graph_def, sites: list[Site], kept: set[str], dtypes: dict[str, int],
                                ranks: dict[str, int], corrected: list[Site] = ()):
    """A copy of ``graph_def`` whose BN sites normalise with the batch's own statistics (``train`` mode).

    Fused ops switch to ``is_training=True`` (TensorFlow's own training computation: biased batch
    variance in the normalisation). Unfused sites get their moving mean / variance inputs replaced by the
    batch mean and biased variance of ``x`` (two-pass), computed in x's dtype, as Keras training does.
    ``corrected`` sites instead normalise with the batch's float32 moments carried by a drift correction
    (``drift.corrected``) that they read from the placeholders ``correction_inputs(site)``; fused ones stay
    inference ops fed those statistics. ``dtypes`` gives the dtype of each replaced input and of each x;
    ``ranks`` the rank of each x.
    """
    import tensorflow as tf
    from tensorflow.core.framework import attr_value_pb2, graph_pb2

    def attr(**kw):
        return attr_value_pb2.AttrValue(**kw)

    out = graph_pb2.GraphDef()
    out.CopyFrom(graph_def)
    nodes = {n.name: n for n in out.node}

    def add(name, op, inputs, **attrs):
        node = out.node.add(name=name, op=op)
        node.input.extend(inputs)
        for key, value in attrs.items():
            node.attr[key].CopyFrom(value)
        return name

    def constant(name, value, dtype):
        return add(name, "Const", [], dtype=attr(type=dtype.as_datatype_enum),
                   value=attr(tensor=tf.make_tensor_proto(value, dtype)))

    def cast(name, value, source: int, target: int):
        return value if source == target else add(name, "Cast", [value], SrcT=attr(type=source), DstT=attr(type=target))

    def moments(site, prefix, dtype: int):
        """The batch mean and biased variance of ``site.x`` in ``dtype``, keeping the reduced dimensions."""
        rank, x_type = ranks[canonical(site.x)], dtypes[canonical(site.x)]
        x = cast(f"{prefix}/x_cast", site.x, x_type, dtype)
        axes = constant(f"{prefix}/axes", [i for i in range(rank) if i != site.axis % rank], tf.int32)
        reduce = {"T": attr(type=dtype), "Tidx": attr(type=tf.int32.as_datatype_enum), "keep_dims": attr(b=True)}
        mean = add(f"{prefix}/mean", "Mean", [x, axes], **reduce)
        deviation = add(f"{prefix}/squared_deviation", "SquaredDifference", [x, mean], T=attr(type=dtype))
        return mean, add(f"{prefix}/variance", "Mean", [deviation, axes], **reduce)

    def corrected_moments(site, prefix):
        """``drift.corrected`` of the batch's float32 moments, keeping the reduced dimensions."""
        f32, rank = tf.float32.as_datatype_enum, ranks[canonical(site.x)]
        mean, variance = moments(site, prefix, f32)
        shape = constant(f"{prefix}/channel_shape", [-1 if i == site.axis % rank else 1 for i in range(rank)],
                         tf.int32)
        offset, then, target = (add(f"{name}/reshaped", "Reshape", [add(name, "Placeholder", [], dtype=attr(type=f32)),
                                                                   shape], T=attr(type=f32))
                                for name in correction_inputs(site))
        eps = constant(f"{prefix}/eps", site.eps, tf.float32)

        def op(name, kind, *inputs):
            return add(f"{prefix}/{name}", kind, list(inputs), T=attr(type=f32))

        ratio = op("ratio", "RealDiv", op("variance_eps", "AddV2", variance, eps), then)
        return (op("corrected_mean", "AddV2", mean, op("moved_offset", "Mul", op("std_ratio", "Sqrt", ratio), offset)),
                op("corrected_variance", "Sub", op("moved_target", "Mul", ratio, target), eps))

    chosen = [(site, False) for site in sites] + [(site, True) for site in corrected]
    for site, correct in chosen:
        if site.node not in kept:
            continue
        prefix = f"{site.node}/bnrepair"
        if site.fused:
            node = nodes[site.node]
            stat_type = node.attr["U"].type if "U" in node.attr else node.attr["T"].type
            if correct:
                flat = constant(f"{prefix}/flat", [-1], tf.int32)
                for slot, value in zip((3, 4), corrected_moments(site, prefix)):
                    value = add(f"{value}_flat", "Reshape", [value, flat], T=attr(type=tf.float32.as_datatype_enum))
                    node.input[slot] = cast(f"{value}_cast", value, tf.float32.as_datatype_enum, stat_type)
                continue
            node.attr["is_training"].CopyFrom(attr(b=True))
            if "exponential_avg_factor" in node.attr:
                node.attr["exponential_avg_factor"].CopyFrom(attr(f=1.0))
            node.input[3] = node.input[4] = constant(f"{prefix}_empty", [], tf.dtypes.as_dtype(stat_type))
            continue
        if site.mean_slot[0] not in nodes or site.var_slot[0] not in nodes:
            continue
        x_type = dtypes[canonical(site.x)]
        dtype = tf.float32.as_datatype_enum if correct else x_type
        values = corrected_moments(site, prefix) if correct else moments(site, prefix, x_type)
        for stat, slot, value in zip(("mean", "variance"), (site.mean_slot, site.var_slot), values):
            node = nodes[slot[0]]
            node.input[slot[1]] = cast(f"{prefix}/{stat}_cast", value, dtype,
                                       dtypes[canonical(node.input[slot[1]])])
    return out
