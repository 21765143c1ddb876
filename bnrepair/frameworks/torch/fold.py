"""torch: fold BN modules into their conv / linear neighbours in a traced copy of the module.

The module graph comes from ``torch.fx`` (BN modules, look-alikes included, kept as leaves) with
shapes from one example batch, so ranks and concat axes are known. Folded BN nodes are removed from
the graph and their modules deleted; the result is a ``GraphModule`` that runs like the original,
can be handed back in memory, saved as ``.pt2`` (``torch.export``) or exported to ONNX. The user's
module is never touched: the work happens on a deep copy.
"""

from __future__ import annotations

import copy
import io
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from ...errors import InputError, first_line
from ...folding import OUTPUT, Decision, Folded, Op, Params, apply, axis_index, bn_affine, plan, probes
from ...writers import atomic_path

ACTIVATION_FUNCTIONS = {"relu", "relu_", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish",
                        "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "softplus", "softmax",
                        "log_softmax", "prelu"}
CONCAT_FUNCTIONS = {"cat", "concat", "concatenate"}
IDENTITY_MODULES = {"Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
                    "DropPath", "StochasticDepth"}
"""Modules that pass their input through at inference (torch's dropouts, timm's DropPath, torchvision's
StochasticDepth): BN folds through them."""


def source(model):
    """An ``eval()`` copy of the module: what the source computes at inference."""
    return copy.deepcopy(model).eval()


def max_opset() -> int:
    """The newest opset ``torch.onnx.export`` writes (it fails on newer ones only after tracing)."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # a private module: without it, a newer opset still fails with one line, only later
        import onnx

        return onnx.defs.onnx_opset_version()
    return ONNX_MAX_OPSET


def unfoldable(model) -> str | None:
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        return ("a TorchScript archive is exported as it is (--no-fold) but not folded: torch.fx cannot trace a "
                "ScriptModule; fold the checkpoint it came from (the state_dict with --arch)")
    return None


def fold(model, bn_ids: set[str], example) -> Folded:
    import torch

    reason = unfoldable(model)
    if reason:
        raise InputError(reason)
    module = source(model)
    try:
        return _folded(torch, module, bn_ids, (_tensor(module, example),))
    except Untraceable as exc:
        raise InputError(f"cannot fold: torch.fx cannot trace the module ({exc})") from None


class Untraceable(Exception):
    """torch.fx traced neither a module nor any sub-module holding its BN layers."""


def _folded(torch, module, bn_ids: set[str], args: tuple) -> Folded:
    """``module`` (called with ``args``) with every BN folded that its fx trace shows foldable. A sub-module fx
    cannot trace (control flow on a tensor's shape or values, as Hugging Face's embeddings check their input) is
    kept as a single call and folded inside, sub-module by sub-module; so is ``module`` itself."""
    opaque: set[str] = set()
    try:
        gm = trace(torch, module, bn_ids, opaque)
    except Exception as exc:
        inside = _inside(torch, module, "", bn_ids, args)
        if not any(d.how for d in inside.decisions):
            raise Untraceable(first_line(exc)) from None
        return inside
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    ops, nodes = _describe(torch, gm, bn_ids)
    decisions = plan(ops, [name for name, op in ops.items() if op.kind == "bn"])
    accepted = [d for d in decisions if d.how]
    targets = {name for d in accepted for name in d.into}
    params = apply(decisions, {d.bn: _affine(gm.get_submodule(d.bn)) for d in accepted},
                   {name: _params(gm.get_submodule(name), ops[name].kind) for name in targets})
    with torch.no_grad():
        for name, p in params.items():
            m = gm.get_submodule(name)
            m.weight = torch.nn.Parameter(torch.as_tensor(p.weight, dtype=m.weight.dtype, device=m.weight.device))
            m.bias = torch.nn.Parameter(torch.as_tensor(p.bias, dtype=m.weight.dtype, device=m.weight.device))
    kept = {}
    for d in accepted:
        tail = _after_norm(torch, gm.get_submodule(d.bn))
        if tail is None:
            node = nodes[d.bn]
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        else:  # a BN-act module: the normalisation folds, its drop and activation stay where it was
            gm.add_submodule(d.bn, tail)
            kept[d.bn] = [(d.bn, None, d.bn)]
    gm.delete_all_unused_submodules()
    gm.recompile()
    channels = {name: p.channels for name, p in params.items()}
    folded = Folded(gm.eval(), decisions, {d.bn: kept.get(d.bn) or probes(d, channels, accepted) for d in accepted},
                    {d.bn: [f"{t}.{w}" for t in d.into for w in ("weight", "bias")] for d in accepted})
    for name in sorted(o for o in opaque if any(_under(bn, o) for bn in bn_ids)):
        _merge(folded, _inside(torch, gm, name, bn_ids, args))
    return folded


def _inside(torch, root, name: str, bn_ids: set[str], args: tuple) -> Folded:
    """The BN layers inside ``root``'s sub-module ``name``, folded within each of its children that holds some
    and is called with tensors alone (its inputs recorded on one run of ``root``); the folded children replace
    the originals in place. The others' BN layers stay, with the reason."""
    outer = root.get_submodule(name) if name else root
    prefix = f"{name}." if name else ""
    holders = {child: m for child, m in outer.named_children() if any(_under(bn, prefix + child) for bn in bn_ids)}
    calls = _first_calls(torch, root, holders, args)
    result = Folded(outer, [], {}, {})
    for child, m in holders.items():
        path = f"{prefix}{child}"
        inner = {bn[len(path) + 1:] for bn in bn_ids if bn.startswith(path + ".")}
        given = calls.get(child)
        if inner and given is not None and all(isinstance(a, torch.Tensor) for a in given):
            try:
                folded = _folded(torch, m, inner, given)
            except Untraceable:
                pass
            else:
                setattr(outer, child, folded.model)
                _merge(result, folded, path)
                continue
        reason = f"inside {name or 'the module'}, which torch.fx cannot trace (kept whole)"
        result.decisions += [Decision(bn, reason=reason) for bn in sorted(bn_ids) if _under(bn, path)]
    return result


def _first_calls(torch, root, children: dict, args: tuple) -> dict:
    """Each of ``children``'s positional inputs on its first call in one run of ``root``, copied; None for a child
    ever called with keyword arguments (its folded trace takes positional inputs alone)."""
    calls: dict = {}

    def recorder(child):
        def hook(module, given, kwargs):
            if kwargs:
                calls[child] = None
            elif child not in calls:
                calls[child] = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in given)
        return hook

    hooks = [m.register_forward_pre_hook(recorder(child), with_kwargs=True) for child, m in children.items()]
    try:
        with torch.no_grad():
            root(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _merge(into: Folded, part: Folded, path: str = "") -> None:
    """``part``'s decisions, probes and tensors, its names made ``path``-relative, added to ``into``'s."""
    def named(n: str) -> str:
        return f"{path}.{n}" if path else n

    into.decisions += [replace(d, bn=named(d.bn), into=[named(t) for t in d.into]) for d in part.decisions]
    into.probes.update({named(bn): [(named(a), where, named(b)) for a, where, b in pairs]
                        for bn, pairs in part.probes.items()})
    into.tensors.update({named(bn): [named(t) for t in names] for bn, names in part.tensors.items()})


def _after_norm(torch, m):
    """What a BN-act module (timm's ``BatchNormAct2d``: ``act(drop(bn(x)))``) does after normalising, as a
    module to leave in the BN's place when the normalisation folds; None for a plain BN."""
    if not (isinstance(getattr(m, "act", None), torch.nn.Module) and isinstance(getattr(m, "drop", None),
                                                                                torch.nn.Module)):
        return None
    return torch.nn.Sequential(m.drop, m.act)


def trace(torch, module, leaves: set[str], opaque: set[str] | None = None):
    """``module`` as a torch.fx GraphModule with the ``leaves`` sub-modules, and every conv / linear module
    (subclasses defined outside ``torch.nn`` included), kept as single calls. Given an ``opaque`` set, a
    sub-module fx cannot trace (control flow on a tensor's shape or values, as in Hugging Face's embeddings) is
    kept as a single call too, and added to it; without, its error is raised."""

    layers = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)  # subclasses too: torchvision's Conv3DSimple
    kept = set() if opaque is None else opaque

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualified_name: str) -> bool:
            return (qualified_name in leaves or qualified_name in kept or isinstance(m, layers)
                    or super().is_leaf_module(m, qualified_name))

    while True:
        tracer = Tracer()
        try:
            graph = tracer.trace(module, concrete_args=_defaults(module))
            break
        except Exception:
            inner = next(reversed(tracer.module_stack), "") if opaque is not None else ""
            if not inner or inner in kept:  # the top level itself, or no progress: its error is the answer
                raise
            kept.add(inner)
    _drop_guards(torch, graph)
    return torch.fx.GraphModule(module, graph)


def _under(name: str, path: str) -> bool:
    """Whether module ``name`` is the sub-module ``path`` or lies inside it."""
    return name == path or name.startswith(path + ".")


def _defaults(module) -> dict:
    """``forward``'s parameters after the input that have defaults, as the traced model is called (input only):
    Python flags (``embed=False``) and Hugging Face's ``return_dict=None`` then trace as constants."""
    import inspect

    parameters = list(inspect.signature(module.forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters
            if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD}


def _drop_guards(torch, graph) -> None:
    """The flags traced as constants leave placeholders checked by ``eq`` / ``_assert`` nodes, which ONNX export
    cannot take: each such placeholder goes with its checks, so the traced model takes its input alone."""
    import operator

    checks = {operator.eq, torch._assert, torch.fx._symbolic_trace._assert_is_none}
    for placeholder in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        found, todo = [], [placeholder]
        while todo:
            node = todo.pop()
            found.append(node)
            todo.extend(node.users)
        if all(n is placeholder or (n.op == "call_function" and n.target in checks) for n in found):
            order = {node: i for i, node in enumerate(graph.nodes)}
            for node in sorted(set(found), key=order.__getitem__, reverse=True):  # users before what they read
                graph.erase_node(node)


def _describe(torch, gm, bn_ids: set[str]) -> tuple[dict[str, Op], dict]:
    """``Op``s by module name (call_module) or node name, and the graph node of each BN module."""
    ops: dict[str, Op] = {}
    nodes = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        name = _name(node)
        users = [u for user in node.users for u in [_name(user)] * _uses(user, node)]
        if name in ops:  # a module called again
            ops[name].calls += 1
            ops[name].users += users
            continue
        ops[name] = _op(torch, gm, node, name, bn_ids)
        ops[name].users = users
        nodes[name] = node
    return ops, nodes


def _name(node) -> str:
    if node.op == "output":
        return OUTPUT
    return node.target if node.op == "call_module" else node.name


def _uses(user, node) -> int:
    import torch

    seen = []
    torch.fx.node.map_arg((user.args, user.kwargs), seen.append)
    return sum(n is node for n in seen)


def _op(torch, gm, node, name: str, bn_ids: set[str]) -> Op:
    nn = torch.nn
    meta = node.meta.get("tensor_meta")
    rank = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    inputs = [_name(n) for n in node.all_input_nodes]
    if node.op == "placeholder":
        return Op(name, "input", "input")
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        kind_type = type(m).__name__
        if node.target in bn_ids:
            tracks = getattr(m, "running_mean", None) is not None
            tail = _after_norm(torch, m)
            return Op(name, "bn", kind_type, inputs, out_axis=1, stats=tracks,
                      activation=None if tail is None else f"{type(m.act).__name__} ({kind_type})")
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            return Op(name, "conv_transpose", kind_type, inputs, out_axis=1, groups=m.groups)
        if isinstance(m, nn.modules.conv._ConvNd):
            padded = m.padding != "valid" and (m.padding == "same" or any(m.padding))
            return Op(name, "conv", kind_type, inputs, out_axis=1, in_axis=1, groups=m.groups, padded=padded)
        if isinstance(m, nn.Linear) and rank:
            return Op(name, "dense", kind_type, inputs, out_axis=rank - 1, in_axis=rank - 1)
        if kind_type.lower() in ACTIVATION_FUNCTIONS | {"leakyrelu", "logsoftmax"}:
            return Op(name, "activation", kind_type, inputs)
        if kind_type in IDENTITY_MODULES:
            return Op(name, "identity", kind_type, inputs)
        return Op(name, "other", kind_type, inputs)
    function = getattr(node.target, "__name__", str(node.target))
    if function in CONCAT_FUNCTIONS and rank:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return Op(name, "concat", function, inputs, out_axis=dim % rank)
    if function in ACTIVATION_FUNCTIONS:
        return Op(name, "activation", function, inputs)
    return Op(name, "other", function, inputs)


def _affine(bn):
    def host(t):
        return None if t is None else t.detach().double().cpu().numpy()

    return bn_affine(host(bn.running_mean), host(bn.running_var), float(getattr(bn, "eps", 1e-5)),
                     host(getattr(bn, "weight", None)), host(getattr(bn, "bias", None)))


def _params(m, kind: str) -> Params:
    """torch weights: conv (out, in/groups, k...), linear (out, in), transposed conv (in, out/groups, k...)
    where output channel = group * (out/groups) + j (the layout plain fusion code gets wrong with groups)."""
    w = m.weight.detach().double().cpu().numpy()
    bias = None if m.bias is None else m.bias.detach().double().cpu().numpy()
    if kind == "conv_transpose":
        per_group = w.shape[0] // m.groups
        return Params(w, bias, axis_index(w.shape, 0) // per_group * w.shape[1] + axis_index(w.shape, 1))
    return Params(w, bias, axis_index(w.shape, 0), axis_index(w.shape, 1))


# --- running, probing, writing -------------------------------------------------------------------------
@contextmanager
def precise():
    """Full float32 while verifying: cuDNN convolutions run in TF32 by default on recent GPUs."""
    import torch

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def run(model, x) -> list[np.ndarray]:
    import torch

    with torch.inference_mode():
        out = model(_tensor(model, x))
    return [t.detach().cpu().numpy() for t in _leaves(out)]


def capture(model, names: set[str], x) -> dict[str, np.ndarray]:
    import torch

    found: dict[str, np.ndarray] = {}
    hooks = [model.get_submodule(name).register_forward_hook(_recording(name, found)) for name in names]
    try:
        with torch.inference_mode():
            model(_tensor(model, x))
    finally:
        for hook in hooks:
            hook.remove()
    return found


def _recording(name: str, found: dict):
    """A forward hook keeping a copy of the output: on the CPU ``.numpy()`` shares the tensor's memory, which
    the model's later in-place ops (``out += identity``, ``ReLU(inplace=True)``) would overwrite."""
    def hook(module, inputs, output):
        found[name] = output.detach().cpu().numpy().copy()

    return hook


def _tensor(model, x):
    import torch

    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    return torch.as_tensor(np.ascontiguousarray(x)).to(device)


def _leaves(out) -> list:
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _leaves(v)]
    return [out]


def save(model, dest: Path, example) -> None:
    """A ``.pt2`` archive from ``torch.export``, batch axis dynamic. Serialized in memory and written by Python:
    torch's archive writer, refused a write, aborts the process when it is freed."""
    import torch

    dest = Path(dest)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(model, (_tensor(model, example),), dynamic_shapes=({0: batch},))
    except Exception as exc:
        raise InputError(f"torch.export failed on the folded module: {first_line(exc)}") from None
    archive = io.BytesIO()
    torch.export.save(program, archive)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(archive.getbuffer())


def output_names(model, example) -> list[str]:
    count = len(run(model, example))
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def to_onnx(model, example, opset: int):
    """ONNX through the TorchScript exporter (the dynamo one needs onnxscript, not a dependency).

    ``training=PRESERVE`` on an ``eval()`` module: in ``EVAL`` mode the exporter fuses Conv+BN on its
    own and renames the weights, which would make ``--no-fold`` fold anyway and hide what was folded.
    """
    import onnx
    import torch

    model = copy.deepcopy(model).cpu().eval()
    x = torch.as_tensor(np.ascontiguousarray(example))
    names = output_names(model, example)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), _native_output_discarded():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=names, dynamic_axes={n: {0: "batch"} for n in ["input", *names]},
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)
    except Exception as exc:
        raise InputError(f"torch.onnx.export failed: {first_line(exc)}") from None
    return onnx.load_from_string(buffer.getvalue())


@contextmanager
def _native_output_discarded():
    """The exporter switches its C++ log on by itself and, when it fails, prints the whole traced graph on the
    process's stdout, past any Python redirect: the error it raises is all the user needs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(os.devnull, "w") as sink:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            yield
    finally:
        for fd, duplicate in saved.items():
            os.dup2(duplicate, fd)
            os.close(duplicate)
