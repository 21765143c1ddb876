"""Keras: fold BN layers into their conv / dense neighbours and rebuild the model without them.

The graph is read from the model's own serialized config (Functional and Sequential containers,
nested ones included): it lists exactly the calls inside this model, whereas live layers may also
remember calls from other models built on them. The folded model is the same config with the folded
BN layers removed (their readers read the BN input instead) and ``use_bias`` switched on where a bias
was gained, deserialized by Keras itself; every weight is copied over and the folded ones replaced.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...folding import OUTPUT, Folded, Op, Params, apply, axis_index, bn_affine, plan, probes
from ...writers import atomic_path, scratch_folder
from ..tf_runtime import import_keras, tf2onnx_converted
from .config_graph import Call, container, is_container, serialized, tensors
from .onnx import IDENTITY_LAYERS, Unsupported, keras_to_onnx

KINDS = {
    **dict.fromkeys(("Conv1D", "Conv2D", "Conv3D"), "conv"),
    **dict.fromkeys(("SeparableConv1D", "SeparableConv2D"), "separable"),
    **dict.fromkeys(("DepthwiseConv1D", "DepthwiseConv2D"), "depthwise"),
    **dict.fromkeys(("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"), "conv_transpose"),
    "Dense": "dense",
    "BatchNormalization": "bn",
    "Concatenate": "concat",
    **dict.fromkeys(("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "PReLU"), "activation"),
    "InputLayer": "input",
    **dict.fromkeys(IDENTITY_LAYERS, "identity"),
}


# --- the graph as folding rules see it ---------------------------------------------------------------
def describe(model, config: dict, prefix: str = "", ops: dict | None = None, layers: dict | None = None):
    """``Op``s of every layer (nested containers under ``name/``) and the live layers by the same names."""
    ops = {} if ops is None else ops
    layers = {} if layers is None else layers
    level = container(model, config, prefix)
    users: dict[str, list[str]] = defaultdict(list)
    for call in level.calls:
        for ref in call.inputs:
            users[ref[0]].append(call.name)
    for ref in level.outputs:
        users[ref[0]].append(OUTPUT)
    counts = defaultdict(int)
    for call in level.calls:
        counts[call.name] += 1
    for entry in config["layers"]:
        name = prefix + entry["config"]["name"]
        if entry["class_name"] == "InputLayer":
            ops[name] = Op(name, "input", "InputLayer", users=users[name])
            continue
        call = next(c for c in level.calls if c.name == name)
        layers[name] = call.layer
        ops[name] = _op(call, users[name], counts[name])
        if is_container(entry):
            describe(call.layer, entry["config"], name + "/", ops, layers)
    for ref in level.inputs:  # a Sequential without an InputLayer entry
        ops.setdefault(ref[0], Op(ref[0], "input", "input", users=users[ref[0]]))
    return ops, layers


def _op(call: Call, users: list[str], calls: int) -> Op:
    config = call.entry["config"]
    kind = KINDS.get(call.cls, "other")
    rank = len(call.shapes[0]) if call.shapes and call.shapes[0] else None
    op = Op(call.name, kind, call.cls, inputs=[r[0] for r in call.inputs], users=users, calls=calls)
    if rank is None or kind in ("other", "input", "activation", "identity"):
        return op
    if kind == "dense":
        op.out_axis = op.in_axis = rank - 1
    elif kind in ("bn", "concat"):
        op.out_axis = int(config["axis"]) % rank
    else:
        op.out_axis = op.in_axis = 1 if config.get("data_format") == "channels_first" else rank - 1
        op.groups = int(config.get("groups", 1))
        op.padded = config.get("padding", "valid") != "valid"
    activation = config.get("activation")
    if activation not in (None, "linear"):
        op.activation = activation if isinstance(activation, str) else str(activation.get("config", activation))
    return op


# --- folding -----------------------------------------------------------------------------------------
def source(model):
    """The model as it runs at inference: the loaded one itself (Keras takes ``training=False``)."""
    return model


def unfoldable(model) -> str | None:
    """Every Functional or Sequential model can be folded (``fold`` names what it leaves and why)."""
    return None


def fold(model, bn_ids: set[str], example=None) -> Folded:
    """Fold every exact BN of ``model`` into a new model (BN layers are found in its config, so ``bn_ids`` is
    not needed); the input model is left unchanged."""
    keras, _ = import_keras()
    data = serialized(model)
    ops, layers = describe(model, data["config"])
    decisions = plan(ops, [name for name, op in ops.items() if op.kind == "bn"])
    accepted = [d for d in decisions if d.how]
    targets = {name for d in accepted for name in d.into}
    params = apply(decisions, {d.bn: _affine(layers[d.bn]) for d in accepted},
                   {name: _params(layers[name], ops[name].kind) for name in targets})
    _edit(data["config"], "", {d.bn for d in accepted}, targets)
    # the model's own custom classes; Keras's are found by their module, and a name such as Add would otherwise
    # shadow the operation of that name (MobileNetV3's ``x + 3.0``)
    classes = {type(layer).__name__: type(layer) for layer in model._flatten_layers(include_self=True)
               if not type(layer).__module__.startswith("keras.")}
    try:  # safe_mode off: the config comes from the model already loaded (its Lambda code runs already)
        folded = keras.saving.deserialize_keras_object(data, custom_objects=classes, safe_mode=False)
    except Exception as exc:
        raise InputError(f"Keras could not rebuild the model without its folded BN layers: {exc}") from None
    updates = {name: {_weight_attr(ops[name].kind): p.weight, "bias": p.bias} for name, p in params.items()}
    _copy_weights(model, folded, "", updates)
    channels = {name: p.channels for name, p in params.items()}
    return Folded(folded, decisions, {d.bn: probes(d, channels, accepted) for d in accepted},
                  {d.bn: [f"{t}/{a}" for t in d.into for a in (_weight_attr(ops[t].kind), "bias")]
                   for d in accepted})


def _weight_attr(kind: str) -> str:
    return "pointwise_kernel" if kind == "separable" else "kernel"


def _affine(bn):
    gamma = bn.gamma.numpy() if bn.scale else None
    beta = bn.beta.numpy() if bn.center else None
    return bn_affine(bn.moving_mean.numpy(), bn.moving_variance.numpy(), float(bn.epsilon), gamma, beta)


def _params(layer, kind: str) -> Params:
    """Keras kernels: conv (k..., in/groups, out), dense (in, out), depthwise (k..., in, multiplier),
    separable's pointwise (1..., in, out), transposed conv (k..., out, in)."""
    w = np.asarray(getattr(layer, _weight_attr(kind)).numpy(), np.float64)
    bias = np.asarray(layer.bias.numpy(), np.float64) if getattr(layer, "use_bias", False) else None
    if kind == "depthwise":
        return Params(w, bias, axis_index(w.shape, -2) * w.shape[-1] + axis_index(w.shape, -1))
    if kind == "conv_transpose":
        return Params(w, bias, axis_index(w.shape, -2))
    return Params(w, bias, axis_index(w.shape, -1), axis_index(w.shape, -2))


def _edit(config: dict, prefix: str, removed: set[str], biased: set[str]) -> None:
    """Remove folded BN entries (their readers read the BN input instead); switch on gained biases."""
    for entry in config["layers"]:
        name = prefix + entry["config"]["name"]
        if is_container(entry):
            _edit(entry["config"], name + "/", removed, biased)
        if name in biased:
            entry["config"]["use_bias"] = True
    gone = {e["config"]["name"]: e for e in config["layers"] if prefix + e["config"]["name"] in removed}
    config["layers"] = [e for e in config["layers"] if e["config"]["name"] not in gone]
    if "input_layers" in config:
        bypass = {name: tuple(tensors(e["inbound_nodes"][0])[0]["keras_history"]) for name, e in gone.items()}
        for entry in config["layers"]:
            entry["inbound_nodes"] = _reroute(entry.get("inbound_nodes", []), bypass)
        config["output_layers"] = _reroute(config["output_layers"], bypass)


def _reroute(fragment, bypass: dict):
    if isinstance(fragment, dict):
        if "keras_history" in fragment and fragment["keras_history"][0] in bypass:
            return {**fragment, "keras_history": list(bypass[fragment["keras_history"][0]])}
        return {k: _reroute(v, bypass) for k, v in fragment.items()}
    if isinstance(fragment, (list, tuple)):
        if len(fragment) == 3 and isinstance(fragment[0], str) and fragment[0] in bypass:
            return list(bypass[fragment[0]])
        return [_reroute(v, bypass) for v in fragment]
    return fragment


def _copy_weights(old, new, prefix: str, updates: dict) -> None:
    keras, _ = import_keras()
    for layer in new.layers:
        name = prefix + layer.name
        original = old.get_layer(layer.name)
        if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
            _copy_weights(original, layer, name + "/", updates)
        elif name in updates:
            current = {v.name: v.numpy() for v in original.weights}
            for var in layer.weights:
                var.assign(np.asarray(updates[name].get(var.name, current.get(var.name)), var.dtype))
        else:
            layer.set_weights(original.get_weights())


# --- running, probing, writing -------------------------------------------------------------------------
def layer_at(model, name: str):
    for part in name.split("/"):
        model = model.get_layer(part)
    return model


@contextmanager
def precise():
    """Full float32 while verifying (TensorFlow runs GPU matmuls and convs in TF32 by default), and no
    retracing warnings from Keras's per-call grouped-conv functions while models run eagerly."""
    _, tf = import_keras()
    before, level = tf.config.experimental.tensor_float_32_execution_enabled(), tf.get_logger().level
    tf.config.experimental.enable_tensor_float_32_execution(False)
    tf.get_logger().setLevel("ERROR")
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(before)
        tf.get_logger().setLevel(level)


def run(model, x) -> list[np.ndarray]:
    keras, _ = import_keras()
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(_call(model, x))]


def output_names(model, example=None) -> list[str]:
    """The output layers' names, as the ONNX graph's outputs are called."""
    level = container(model, serialized(model)["config"])
    return [ref[0] for ref in level.outputs]


def _call(model, x):
    """One input array, passed in the structure the model declares (a one-element list for Keras 2 files)."""
    return model([x] if isinstance(getattr(model, "input", None), list) else x, training=False)


def capture(model, names: set[str], x) -> dict[str, np.ndarray]:
    """The outputs of the named layers for input ``x`` (one eager pass with their ``call`` wrapped)."""
    keras, _ = import_keras()
    found: dict[str, np.ndarray] = {}
    patched = []
    try:
        for name in names:
            layer = layer_at(model, name)
            layer.call = _recording(type(layer).call.__get__(layer), name, found, keras)
            patched.append(layer)
        _call(model, x)
    finally:
        for layer in patched:
            layer.__dict__.pop("call", None)
    return found


def _recording(call, name: str, found: dict, keras):
    def recorded(*args, **kwargs):
        out = call(*args, **kwargs)
        found[name] = np.asarray(keras.ops.convert_to_numpy(out))
        return out

    return recorded


def save(model, dest: Path, example=None) -> None:
    """``.h5`` or ``.keras``, moved into place when complete; a refused write is one line. The ``.h5`` is built in
    memory and written by Python: HDF5 whose own write was refused leaves its library broken (the process
    crashes at exit)."""
    dest = Path(dest)
    if dest.suffix.lower() in (".h5", ".hdf5"):
        import h5py
        from keras.src.legacy.saving.legacy_h5_format import save_model_to_hdf5  # what model.save calls for .h5

        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            save_model_to_hdf5(model, f)
        with atomic_path(dest) as tmp:
            tmp.write_bytes(image.getvalue())
        return
    with scratch_folder(dest) as tmp:  # Keras names its own temporaries beside the file it writes
        model.save(tmp / dest.name)
        os.replace(tmp / dest.name, dest)


def max_opset() -> int:
    """The emitter writes every opset the installed onnx knows (the result is verified in onnxruntime anyway)."""
    import onnx

    return onnx.defs.onnx_opset_version()


def to_onnx(model, example, opset: int):
    """bnrepair's own emitter, which keeps Keras's layer and weight names (those the fold record gives); where it
    lacks a layer, tf2onnx's conversion of the model's inference function, which takes every op TensorFlow runs
    at inference (preprocessing layers, UpSampling2D, LayerNormalization, custom layers)."""
    try:
        return keras_to_onnx(model, opset)
    except Unsupported:
        return _through_tf2onnx(model, example, opset)


def _through_tf2onnx(model, example, opset: int):
    _, tf = import_keras()
    spec = tf.TensorSpec((None, *np.shape(example)[1:]), tf.float32, name="input")
    function = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return tf2onnx_converted(function, spec, opset, "the Keras model")
