"""BN in a SavedModel's flat graph: the sites, and the rewrite that makes them measure batch statistics.

The graph analysed is the one the SavedModel stores for serving (what TF Serving runs), so no Python
code of the model is needed; ``tf_graph.flatten`` inlines its functions into one GraphDef. BN sites are
recognised by op pattern: ``FusedBatchNorm*`` in inference mode, or the unfused
``x * (rsqrt(variance + eps) * gamma) + (beta - mean * ...)`` of ``tf.nn.batch_normalization`` (Keras 3, and
Keras 2 on non-4D inputs), both with moving statistics read from variables. The TF1 wing finds its sites the
same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ... import drift
from ..tf_graph import PLUMBING, FlatGraph, canonical, data_inputs, split

FUSED_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}
TF_OPS = {"add": "AddV2", "sub": "Sub", "mul": "Mul", "div": "RealDiv", "sqrt": "Sqrt"}
"""the ops that ``drift.Symbol``'s arithmetic adds"""


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


def find_bn(graph: FlatGraph, keep: set[str]) -> tuple[list[Site], list[str]]:
    """BN sites among ``keep``, in forward order, and one line per candidate that was not one."""
    sites, rejected = [], []
    order = graph.topological(keep)
    for name in sorted(keep, key=order.get):
        node = graph.nodes[name]
        if node.op in FUSED_OPS:
            found = _fused(graph, node)
        elif node.op == "Rsqrt":
            found = _unfused(graph, node)
        else:
            continue
        if isinstance(found, str):
            rejected.append(found)
        else:
            found.producer = _producer(graph, found.x)
            sites.append(found)
    # the BN input's position, not the op's: an unfused site's Rsqrt depends on variables only
    return sorted(sites, key=lambda s: order[split(s.x)[0]]), rejected


def _fused(graph: FlatGraph, node) -> Site | str:
    if node.attr["is_training"].b:
        return f"{node.op} {node.name} normalises with batch statistics (is_training=True)"
    x, scale, offset, mean, var = data_inputs(node)[:5]
    mean_var, var_var = graph.variable_of(mean), graph.variable_of(var)
    if mean_var is None or var_var is None:
        return f"{node.op} {node.name} takes its mean/variance from constants or computations, not variables"
    return Site(node=node.name, fused=True, x=x, mean_var=mean_var, var_var=var_var, eps=float(node.attr["epsilon"].f),
                axis=1 if node.attr["data_format"].s.decode().startswith("NC") else -1,
                gamma_var=graph.variable_of(scale), beta_var=graph.variable_of(offset))


def _unfused(graph: FlatGraph, rsqrt) -> Site | str:
    """``tf.nn.batch_normalization``: inv = rsqrt(var + eps) [* gamma]; x * inv + (beta - mean * inv)."""
    where = f"Rsqrt {rsqrt.name}"
    add = graph.nodes.get(split(data_inputs(rsqrt)[0])[0])
    if add is None or add.op not in ("Add", "AddV2"):
        return f"{where} is not rsqrt(variance + epsilon)"
    a, b = data_inputs(add)[:2]
    eps, var_in, var_index = (graph.const(b), a, 0) if graph.const(b) is not None else (graph.const(a), b, 1)
    var_var = graph.variable_of(var_in)
    if eps is None or eps.size != 1 or var_var is None:
        return f"{where}: its variance is not a stored variable plus a constant epsilon (batch statistics?)"
    inv, gamma = rsqrt.name, None
    muls = [(m, i) for m, i in graph.users(inv) if m.op == "Mul"]
    if len(muls) == 1 and graph.variable_of(data_inputs(muls[0][0])[1 - muls[0][1]]):
        scale_mul = muls[0][0]
        gamma = graph.variable_of(data_inputs(scale_mul)[1 - muls[0][1]])
        inv = scale_mul.name
        muls = [(m, i) for m, i in graph.users(inv) if m.op == "Mul"]
    mean_side, x_side = [], []
    for mul, index in muls:
        other_index = 1 - index
        other = data_inputs(mul)[other_index]
        slot = (mul.name, other_index)
        source = graph.nodes.get(split(other)[0])
        if source is not None and source.op == "Neg":  # center=False: -mean * inv
            slot, other = (source.name, 0), data_inputs(source)[0]
        (mean_side if graph.variable_of(other) else x_side).append((slot, other))
    if len(mean_side) != 1 or len(x_side) != 1:
        return f"{where} does not feed exactly one x * inv and one mean * inv"
    (mean_slot, mean_in), (_, x) = mean_side[0], x_side[0]
    beta = _beta(graph, mean_slot[0]) if graph.nodes[mean_slot[0]].op == "Mul" else None
    axis = graph.reshape_axis(mean_in)
    return Site(node=rsqrt.name, fused=False, x=x, mean_var=graph.variable_of(mean_in), var_var=var_var,
                eps=float(eps.reshape(-1)[0]), axis=-1 if axis is None else axis, gamma_var=gamma, beta_var=beta,
                mean_slot=mean_slot, var_slot=(add.name, var_index))


def _beta(graph: FlatGraph, mean_mul: str) -> str | None:
    """beta in ``beta - mean * inv``, when there is one."""
    for user, index in graph.users(mean_mul):
        if user.op == "Sub" and index == 1:
            return graph.variable_of(data_inputs(user)[0])
    return None


def _producer(graph: FlatGraph, tensor: str) -> tuple[str, str]:
    name, index = split(tensor)
    node = graph.nodes[name]
    while node.op in ("Identity", "IdentityN") and data_inputs(node):
        name, index = split(data_inputs(node)[index if node.op == "IdentityN" else 0])
        node = graph.nodes[name]
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


def correction_inputs(site: Site) -> list[str]:
    """The float32 placeholders a corrected site reads its correction from (``rewire_for_batch_statistics``)."""
    return [f"{site.node}/bnrepair/correction_{part}" for part in drift.PARTS]


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

        def emit(op, inputs):
            return add(f"{prefix}/corrected_{len(out.node)}", TF_OPS[op], list(inputs), T=attr(type=f32))

        values = drift.corrected(drift.Symbol(mean, emit), drift.Symbol(variance, emit),
                                 [drift.Symbol(v, emit) for v in (offset, then, target)], drift.Symbol(eps, emit))
        return tuple(v.value for v in values)

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
