"""ONNX graphs written from Keras layers with ``onnx.helper``.

Keras 3's own ONNX export goes through tf2onnx, which is not a dependency and folds BN by itself
(``--no-fold`` could not be honoured) while renaming every weight after TF ops, so the record of
which BN went into which tensor would be lost. This emitter writes the supported layer set directly,
names each weight ``<layer>/<weight>``, and is checked against Keras by onnxruntime on every export.

Tensors stay channels-first inside the graph wherever an ONNX op needs it: each value carries the
permutation from the Keras layout, and a Transpose is inserted only where a layer needs another one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import InputError
from .config_graph import container, is_container, serialized, tensors

IDENTITY_LAYERS = {"Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
                   "GaussianDropout", "AlphaDropout", "Identity", "ActivityRegularization"}
MERGE_OPS = {"Add": "Sum", "Maximum": "Max", "Minimum": "Min", "Average": "Mean", "Multiply": "Mul",
             "Subtract": "Sub"}
ACTIVATIONS = {"linear", "relu", "relu6", "sigmoid", "tanh", "softmax", "elu", "selu", "softplus", "softsign",
               "silu", "swish", "gelu", "hard_sigmoid", "hard_silu", "hard_swish", "leaky_relu", "exponential"}
HANDLERS = {
    "InputLayer": None,
    **dict.fromkeys(("Conv1D", "Conv2D", "Conv3D"), "emit_conv"),
    **dict.fromkeys(("DepthwiseConv1D", "DepthwiseConv2D"), "emit_depthwise"),
    **dict.fromkeys(("SeparableConv1D", "SeparableConv2D"), "emit_separable"),
    **dict.fromkeys(("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"), "emit_conv_transpose"),
    **dict.fromkeys(("MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
                     "AveragePooling3D"), "emit_pooling"),
    **dict.fromkeys(("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
                     "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D"), "emit_global_pooling"),
    **dict.fromkeys(("ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D"), "emit_zero_padding"),
    "Dense": "emit_dense", "BatchNormalization": "emit_batch_normalization", "Activation": "emit_activation",
    "ReLU": "emit_relu", "LeakyReLU": "emit_leaky_relu", "ELU": "emit_elu", "Softmax": "emit_softmax",
    "Concatenate": "emit_concatenate", "Flatten": "emit_flatten", "Reshape": "emit_reshape",
    "Rescaling": "emit_rescaling", "Normalization": "emit_normalization", "Masking": "emit_masking",
    **dict.fromkeys(("Cropping1D", "Cropping2D", "Cropping3D"), "emit_cropping"),
}
"""Keras layer class -> the Emitter method that writes it."""
OPERATIONS = {"Add": "Add", "Subtract": "Sub", "Multiply": "Mul", "Divide": "Div", "TrueDivide": "Div",
              "NotEqual": "NotEqual", "Any": "Any"}
"""Keras 3 operations a Functional config records outside layers (``x + 3.0`` in MobileNetV3's hard-swish;
``NotEqual`` and ``Any``, with which a Masking layer's mask is computed)."""
MASK_BLIND = {"BatchNormalization", "Dense", "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Masking",
              *IDENTITY_LAYERS}
"""Layers whose inference output does not depend on the mask they are handed (Keras's BN uses its moving
statistics whatever the mask); masks reach ``GlobalAveragePooling1D`` too, which averages the unmasked steps."""


def is_operation(entry: dict) -> bool:
    return str(entry.get("module", "")).startswith("keras.src.ops")


@dataclass
class Value:
    """An ONNX tensor name, and ``perm``: ONNX axis i holds Keras axis perm[i] (None: Keras layout)."""

    name: str
    perm: tuple | None = None
    shape: tuple = ()

    @property
    def rank(self) -> int:
        return len(self.shape)

    def axis(self, keras_axis: int) -> int:
        keras_axis %= self.rank
        return self.perm.index(keras_axis) if self.perm else keras_axis


def channels_first(rank: int) -> tuple:
    return (0, rank - 1, *range(1, rank - 1))


class Unsupported(InputError):
    """The model holds layers the emitter has no ONNX for."""


def keras_to_onnx(model, opset: int):
    """An ``onnx.ModelProto`` computing ``model`` at inference, batch axis dynamic."""
    import onnx
    from onnx import helper

    data = serialized(model)
    unsupported = sorted(_unsupported(model, data["config"]))
    if unsupported:
        raise Unsupported("cannot export to ONNX: unsupported Keras layer(s) " + ", ".join(unsupported))
    emitter = Emitter(opset)
    level = container(model, data["config"])
    emitter.names.update(ref[0] for ref in level.inputs)
    shapes = [tuple(t.shape) for t in model.inputs]
    inputs = [Value(ref[0], None, shape) for ref, shape in zip(level.inputs, shapes)]
    graph_inputs = [helper.make_tensor_value_info(v.name, onnx.TensorProto.FLOAT, ["batch", *v.shape[1:]])
                    for v in inputs]
    outputs = emitter.container(model, data["config"], "", inputs)
    graph_outputs = []
    for ref, value in zip(level.outputs, outputs):
        name = emitter.unique(ref[0])
        emitter.node("Identity", [emitter.layout(value, None).name], name=name, output=name)
        graph_outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                           ["batch", *value.shape[1:]]))
    graph = helper.make_graph(emitter.nodes, model.name, graph_inputs, graph_outputs, emitter.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bnrepair")
    proto.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    return proto


def _unsupported(model, config: dict, prefix: str = "") -> set[str]:
    found = set()
    for call in container(model, config, prefix).calls:
        if is_container(call.entry):
            found |= _unsupported(call.layer, call.entry["config"], call.name + "/")
        elif is_operation(call.entry):
            if call.cls not in OPERATIONS:
                found.add(f"{call.name} (operation {call.cls})")
        elif call.cls not in HANDLERS and call.cls not in IDENTITY_LAYERS and call.cls not in MERGE_OPS:
            found.add(f"{call.name} ({call.cls})")
    return found


class Emitter:
    """Collects nodes and initializers while the containers are walked in call order."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self.names: set[str] = set()

    # --- building blocks ------------------------------------------------------------------------------
    def unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.names:
            candidate, i = f"{name}_{i}", i + 1
        self.names.add(candidate)
        return candidate

    def const(self, name: str, array, dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self.unique(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(array, dtype)), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, output: str | None = None, **attrs) -> str:
        from onnx import helper

        output = output or self.unique(f"{name}/{op}")
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.unique(f"{name}/{op}#node"), **attrs))
        return output

    def layout(self, value: Value, perm: tuple | None) -> Value:
        """``value`` with ONNX axis i holding Keras axis ``perm[i]`` (a Transpose when it differs)."""
        have = value.perm or tuple(range(value.rank))
        want = perm or tuple(range(value.rank))
        if have == want:
            return Value(value.name, perm, value.shape)
        moved = self.node("Transpose", [value.name], value.name, perm=[have.index(a) for a in want])
        return Value(moved, perm, value.shape)

    def spatial(self, value: Value, layer) -> Value:
        """The layout ONNX's conv / pool ops read: channels on axis 1."""
        cf = getattr(layer, "data_format", "channels_last") == "channels_first"
        return self.layout(value, None if cf else channels_first(value.rank))

    def activation(self, name: str, fn, value: Value) -> Value:
        import keras

        key = fn if isinstance(fn, str) else keras.activations.serialize(fn)
        if not isinstance(key, str) or key not in ACTIVATIONS:
            raise InputError(f"cannot export to ONNX: {name} uses activation {key!r}")
        x, out = value.name, None
        if key == "linear":
            return value
        simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softplus": "Softplus",
                  "softsign": "Softsign", "selu": "Selu", "exponential": "Exp"}
        if key in simple:
            out = self.node(simple[key], [x], name)
        elif key == "elu":
            out = self.node("Elu", [x], name, alpha=1.0)
        elif key == "leaky_relu":
            out = self.node("LeakyRelu", [x], name, alpha=0.2)
        elif key == "relu6":
            out = self.clip(name, x, 0.0, 6.0)
        elif key == "softmax":
            out = self.node("Softmax", [x], name, axis=value.axis(-1))
        elif key == "hard_sigmoid":
            out = self.node("HardSigmoid", [x], name, alpha=1 / 6, beta=0.5)
        elif key in ("silu", "swish"):
            out = self.node("Mul", [x, self.node("Sigmoid", [x], name)], name)
        elif key in ("hard_silu", "hard_swish"):
            out = self.node("Mul", [x, self.node("HardSigmoid", [x], name, alpha=1 / 6, beta=0.5)], name)
        elif key == "gelu":  # Keras' default: the exact form with erf
            erf = self.node("Erf", [self.node("Mul", [x, self.const(f"{name}/rsqrt2", 0.5 ** 0.5)], name)], name)
            half = self.node("Mul", [x, self.const(f"{name}/half", 0.5)], name)
            out = self.node("Mul", [half, self.node("Add", [erf, self.const(f"{name}/one", 1.0)], name)], name)
        return Value(out, value.perm, value.shape)

    def clip(self, name: str, x: str, low: float | None, high: float | None) -> str:
        bounds = [self.const(f"{name}/min", low) if low is not None else "",
                  self.const(f"{name}/max", high) if high is not None else ""]
        return self.node("Clip", [x, *bounds], name)

    # --- containers ---------------------------------------------------------------------------------------
    def container(self, model, config: dict, prefix: str, inputs: list[Value]) -> list[Value]:
        level = container(model, config, prefix)
        values = {ref: value for ref, value in zip(level.inputs, inputs)}
        seen: dict[str, int] = {}
        for call in level.calls:
            if call.cls == "InputLayer":
                continue
            node = seen[call.name] = seen.get(call.name, -1) + 1
            try:
                args = [Value(values[ref].name, values[ref].perm, shape or values[ref].shape)
                        for ref, shape in zip(call.inputs, call.shapes)]
            except KeyError as exc:
                raise InputError(f"cannot export to ONNX: {call.name} reads {exc.args[0][0]}, which is not "
                                 "computed before it") from None
            recorded = call.entry.get("inbound_nodes") or [{}]
            mask = None
            if len(tensors(recorded[node].get("kwargs", {}).get("mask"))) == 1:  # read after the args' tensors
                args, mask = args[:-1], args[-1]
            if is_container(call.entry):
                outs = self.container(call.layer, call.entry["config"], call.name + "/", args)
            elif is_operation(call.entry):
                outs = [self.operation(call.name, call.cls, call.layer, recorded[node]["args"], args)]
            else:
                outs = [self.layer(call.name, call.cls, call.layer, args, mask)]
            for i, value in enumerate(outs):
                values[(call.name, node, i)] = value
        return [values[ref] for ref in level.outputs]

    def layer(self, name: str, cls: str, layer, args: list[Value], mask: Value | None = None) -> Value:
        if mask is not None and cls not in MASK_BLIND and cls != "GlobalAveragePooling1D":
            raise InputError(f"cannot export to ONNX: {name} ({cls}) takes a mask, which the emitter does not "
                             "carry through it")
        x = args[0]
        out_shape = tuple(layer.compute_output_shape(x.shape if len(args) == 1 else [a.shape for a in args]))
        if cls in IDENTITY_LAYERS:
            return x
        if cls in MERGE_OPS:
            names = [self.layout(a, x.perm).name for a in args]
            if MERGE_OPS[cls] in ("Mul", "Sub"):  # binary in ONNX
                out = names[0]
                for other in names[1:]:
                    out = self.node(MERGE_OPS[cls], [out, other], name)
            else:
                out = self.node(MERGE_OPS[cls], names, name)
            return Value(out, x.perm, out_shape)
        if cls == "GlobalAveragePooling1D" and mask is not None:
            value = self.masked_average(name, layer, x, mask)
        else:
            value = getattr(self, HANDLERS[cls])(name, layer, x, args)
        return Value(value.name, value.perm, out_shape)

    def operation(self, name: str, cls: str, op, arguments: list, tensors: list[Value]) -> Value:
        """A binary element-wise operation whose arguments are tensors (in order, ``tensors``) or numbers, or
        ``Any`` along axes. A boolean (mask) is kept as float 0 / 1, as masks are used."""
        if cls == "Any":
            x = self.layout(tensors[0], None)
            axes = sorted({a % x.rank for a in (op.axis if op.axis is not None else range(x.rank))})
            out = self.reduce("ReduceMax", x.name, axes, bool(op.keepdims), name)
            return Value(out, None, tuple(d for i, d in enumerate(x.shape) if op.keepdims or i not in axes))
        tensors, first, names = iter(tensors), None, []
        for argument in arguments:
            if isinstance(argument, dict):
                value = next(tensors)
                first = first or value
                names.append(self.layout(value, first.perm).name)
            else:
                names.append(self.const(f"{name}/constant", argument))
        if first is None or len(names) != 2:
            raise InputError(f"cannot export to ONNX: {name} (operation {cls} of {len(names)} arguments)")
        if cls == "NotEqual":
            return Value(self.not_equal(name, *names), first.perm, first.shape)
        return Value(self.node(OPERATIONS[cls], names, name), first.perm, first.shape)

    def not_equal(self, name: str, a: str, b: str) -> str:
        """``a != b`` as float 0 / 1, the form masks are used in."""
        return self.node("Cast", [self.node("Not", [self.node("Equal", [a, b], name)], name)], name, to=1)

    def reduce(self, op: str, x: str, axes: list[int], keepdims: bool, name: str) -> str:
        """``op`` over ``axes``: an input from opset 18 on (13 for ReduceSum), an attribute before."""
        since = 13 if op == "ReduceSum" else 18
        if self.opset >= since:
            return self.node(op, [x, self.const(f"{name}/axes", axes, np.int64)], name, keepdims=int(keepdims))
        return self.node(op, [x], name, axes=axes, keepdims=int(keepdims))

    # --- layers ----------------------------------------------------------------------------------------------
    def conv(self, name, layer, x, weight, bias, *, group: int, strides, dilations, padding: str) -> Value:
        """An ONNX Conv on ``x`` in channels-first layout; ``weight`` is (out, in/group, k...)."""
        kernel_shape = self.shape_of(weight)[2:]
        n = len(kernel_shape)
        inputs = [x.name, weight] + ([bias] if bias else [])
        out = self.node("Conv", inputs, name, kernel_shape=list(kernel_shape), group=group,
                        strides=list(_tuple(strides, n)), dilations=list(_tuple(dilations, n)),
                        **self.padding(name, padding, n))
        return Value(out, x.perm, x.shape)

    def shape_of(self, initializer: str) -> tuple:
        return next(tuple(t.dims) for t in self.initializers if t.name == initializer)

    def padding(self, name: str, padding: str, spatial: int) -> dict:
        if padding == "valid":
            return {"pads": [0] * (2 * spatial)}
        if padding == "same":
            return {"auto_pad": "SAME_UPPER"}
        raise InputError(f"cannot export to ONNX: {name} uses padding={padding!r}")

    def bias(self, name, layer) -> str | None:
        return self.const(f"{name}/bias", layer.bias.numpy()) if layer.use_bias else None

    def emit_conv(self, name, layer, x, args):
        """Keras kernel (k..., in/groups, out)."""
        x = self.spatial(x, layer)
        weight = self.const(f"{name}/kernel", _onnx_kernel(layer.kernel.numpy()))
        out = self.conv(name, layer, x, weight, self.bias(name, layer), group=layer.groups, strides=layer.strides,
                        dilations=layer.dilation_rate, padding=layer.padding)
        return self.activation(name, layer.activation, out)

    def emit_depthwise(self, name, layer, x, args):
        """Keras kernel (k..., in, multiplier): one group per input channel, output channel in*m + j."""
        x = self.spatial(x, layer)
        k = layer.kernel.numpy()
        weight = self.const(f"{name}/kernel", _onnx_kernel(k.reshape(*k.shape[:-2], 1, -1)))
        out = self.conv(name, layer, x, weight, self.bias(name, layer), group=k.shape[-2], strides=layer.strides,
                        dilations=layer.dilation_rate, padding=layer.padding)
        return self.activation(name, layer.activation, out)

    def emit_separable(self, name, layer, x, args):
        x = self.spatial(x, layer)
        k = layer.depthwise_kernel.numpy()
        depthwise = self.const(f"{name}/depthwise_kernel", _onnx_kernel(k.reshape(*k.shape[:-2], 1, -1)))
        x = self.conv(name, layer, x, depthwise, None, group=k.shape[-2], strides=layer.strides,
                      dilations=layer.dilation_rate, padding=layer.padding)
        pointwise = self.const(f"{name}/pointwise_kernel", _onnx_kernel(layer.pointwise_kernel.numpy()))
        out = self.conv(name, layer, x, pointwise, self.bias(name, layer), group=1, strides=1, dilations=1,
                        padding="valid")
        return self.activation(name, layer.activation, out)

    def emit_conv_transpose(self, name, layer, x, args):
        """Keras kernel (k..., out, in) -> ONNX (in, out, k...); pads and output_padding give Keras's
        output size: the begin crop of a TF "same" transposed conv is the forward conv's begin pad."""
        last = layer.data_format == "channels_last"
        out_shape = layer.compute_output_shape(x.shape)
        spatial_in = x.shape[1:-1] if last else x.shape[2:]
        spatial_out = out_shape[1:-1] if last else out_shape[2:]
        if any(d is None for d in (*spatial_in, *spatial_out)):
            raise InputError(f"cannot export to ONNX: {name} needs static spatial sizes")
        x = self.spatial(x, layer)
        k = layer.kernel.numpy()
        n = k.ndim - 2
        strides, dilation = _tuple(layer.strides, n), _tuple(layer.dilation_rate, n)
        begin, end, extra = [], [], []
        for size, out, kernel, s, d in zip(spatial_in, spatial_out, k.shape[:n], strides, dilation):
            effective = (kernel - 1) * d + 1
            total = max((-(-out // s) - 1) * s + effective - out, 0) if layer.padding == "same" else 0
            full = (size - 1) * s + effective
            begin.append(total // 2)
            extra.append(max(0, out + total // 2 - full))
            end.append(full + extra[-1] - total // 2 - out)
        inputs = [x.name, self.const(f"{name}/kernel", np.transpose(k, (n + 1, n, *range(n))))]
        inputs += [b for b in [self.bias(name, layer)] if b]
        out = self.node("ConvTranspose", inputs, name, kernel_shape=list(k.shape[:n]), strides=list(strides),
                        dilations=list(dilation), pads=begin + end, output_padding=extra)
        return self.activation(name, layer.activation, Value(out, x.perm, x.shape))

    def emit_dense(self, name, layer, x, args):
        x = self.layout(x, None)
        out = self.node("MatMul", [x.name, self.const(f"{name}/kernel", layer.kernel.numpy())], name)
        if layer.use_bias:
            out = self.node("Add", [out, self.bias(name, layer)], name)
        return self.activation(name, layer.activation, Value(out, None, x.shape))

    def emit_batch_normalization(self, name, layer, x, args):
        """ONNX BatchNormalization normalises axis 1: move the BN axis there when it is not."""
        axis = layer.axis % x.rank
        if x.axis(axis) != 1:
            rest = [a for a in range(x.rank) if a != axis]
            x = self.layout(x, (rest[0], axis, *rest[1:]))
        channels = layer.moving_mean.shape[0]
        gamma = layer.gamma.numpy() if layer.scale else np.ones(channels)
        beta = layer.beta.numpy() if layer.center else np.zeros(channels)
        inputs = [x.name] + [self.const(f"{name}/{n}", v) for n, v in (
            ("gamma", gamma), ("beta", beta), ("moving_mean", layer.moving_mean.numpy()),
            ("moving_variance", layer.moving_variance.numpy()))]
        return Value(self.node("BatchNormalization", inputs, name, epsilon=float(layer.epsilon)), x.perm, x.shape)

    def emit_activation(self, name, layer, x, args):
        return self.activation(name, layer.activation, x)

    def emit_relu(self, name, layer, x, args):
        slope, top = float(layer.negative_slope), layer.max_value
        if float(layer.threshold) != 0.0 or (slope and top is not None):
            raise InputError(f"cannot export to ONNX: {name} (ReLU with a threshold, or with both a slope "
                             "and max_value)")
        if slope:
            return Value(self.node("LeakyRelu", [x.name], name, alpha=slope), x.perm, x.shape)
        out = self.node("Relu", [x.name], name)
        return Value(out if top is None else self.clip(name, out, None, float(top)), x.perm, x.shape)

    def emit_leaky_relu(self, name, layer, x, args):
        return Value(self.node("LeakyRelu", [x.name], name, alpha=float(layer.negative_slope)), x.perm, x.shape)

    def emit_elu(self, name, layer, x, args):
        return Value(self.node("Elu", [x.name], name, alpha=float(layer.alpha)), x.perm, x.shape)

    def emit_softmax(self, name, layer, x, args):
        if not isinstance(layer.axis, int):
            raise InputError(f"cannot export to ONNX: {name} (Softmax over several axes)")
        return Value(self.node("Softmax", [x.name], name, axis=x.axis(layer.axis)), x.perm, x.shape)

    def emit_concatenate(self, name, layer, x, args):
        names = [self.layout(a, x.perm).name for a in args]
        return Value(self.node("Concat", names, name, axis=x.axis(layer.axis)), x.perm, x.shape)

    def emit_flatten(self, name, layer, x, args):
        """Keras flattens in channels-last order, also for ``data_format="channels_first"``."""
        x = self.layout(x, (0, *range(2, x.rank), 1) if layer.data_format == "channels_first" and x.rank > 2
                        else None)
        return Value(self.node("Flatten", [x.name], name, axis=1), None, x.shape)

    def emit_reshape(self, name, layer, x, args):
        x = self.layout(x, None)
        shape = self.const(f"{name}/shape", [0, *layer.target_shape], np.int64)
        return Value(self.node("Reshape", [x.name, shape], name), None, x.shape)

    def emit_pooling(self, name, layer, x, args):
        """TF "same" average pooling leaves the padding out of the count, as count_include_pad=0 does."""
        x = self.spatial(x, layer)
        n = x.rank - 2
        op = "MaxPool" if type(layer).__name__.startswith("Max") else "AveragePool"
        attrs = self.padding(name, layer.padding, n)
        if op == "AveragePool":
            attrs["count_include_pad"] = 0
        out = self.node(op, [x.name], name, kernel_shape=list(_tuple(layer.pool_size, n)),
                        strides=list(_tuple(layer.strides or layer.pool_size, n)), **attrs)
        return Value(out, x.perm, x.shape)

    def emit_global_pooling(self, name, layer, x, args):
        x = self.spatial(x, layer)
        op = "GlobalMaxPool" if type(layer).__name__.startswith("GlobalMax") else "GlobalAveragePool"
        out = self.node(op, [x.name], name)
        if layer.keepdims:
            return Value(out, x.perm, x.shape)
        return Value(self.node("Flatten", [out], name, axis=1), None, x.shape)

    def emit_masking(self, name, layer, x, args):
        """Keras's Masking: steps whose features all equal ``mask_value`` become zeros."""
        keep = self.not_equal(name, x.name, self.const(f"{name}/mask_value", layer.mask_value))
        step = self.reduce("ReduceMax", keep, [x.axis(-1)], True, name)
        return Value(self.node("Mul", [x.name, step], name), x.perm, x.shape)

    def masked_average(self, name, layer, x, mask: Value):
        """GlobalAveragePooling1D under a mask: the mean over the unmasked steps, as Keras computes it."""
        if layer.data_format != "channels_last":
            raise InputError(f"cannot export to ONNX: {name} averages a masked channels-first sequence")
        x, mask = self.layout(x, None), self.layout(mask, None)
        weights = self.node("Unsqueeze", [mask.name, self.const(f"{name}/axis", [2], np.int64)], name)
        total = self.reduce("ReduceSum", self.node("Mul", [x.name, weights], name), [1], layer.keepdims, name)
        count = self.reduce("ReduceSum", weights, [1], layer.keepdims, name)
        return Value(self.node("Div", [total, count], name), None, x.shape)

    def emit_zero_padding(self, name, layer, x, args):
        x = self.spatial(x, layer)
        padding = np.reshape(layer.padding, (-1, 2))
        pads = [0, 0, *padding[:, 0], 0, 0, *padding[:, 1]]
        return Value(self.node("Pad", [x.name, self.const(f"{name}/pads", pads, np.int64)], name), x.perm, x.shape)

    def emit_rescaling(self, name, layer, x, args):
        """``x * scale + offset``; per-channel values broadcast over Keras's last axis."""
        scale, offset = np.asarray(layer.scale, np.float32), np.asarray(layer.offset, np.float32)
        if scale.ndim or offset.ndim:
            x = self.layout(x, None)
        out = self.node("Mul", [x.name, self.const(f"{name}/scale", scale)], name)
        return Value(self.node("Add", [out, self.const(f"{name}/offset", offset)], name), x.perm, x.shape)

    def emit_normalization(self, name, layer, x, args):
        """Keras: ``(x - mean) / max(sqrt(variance), epsilon)``, mean and variance in the input's broadcast shape
        (``invert``: the other way round)."""
        import keras

        x = self.layout(x, None)
        mean = np.asarray(layer.mean, np.float32)
        spread = np.maximum(np.sqrt(np.asarray(layer.variance, np.float32)), keras.backend.epsilon())
        if layer.invert:
            out = self.node("Mul", [x.name, self.const(f"{name}/spread", spread)], name)
            return Value(self.node("Add", [out, self.const(f"{name}/mean", mean)], name), None, x.shape)
        out = self.node("Sub", [x.name, self.const(f"{name}/mean", mean)], name)
        return Value(self.node("Div", [out, self.const(f"{name}/spread", spread)], name), None, x.shape)

    def emit_cropping(self, name, layer, x, args):
        x = self.spatial(x, layer)
        crops = np.reshape(layer.cropping, (-1, 2))
        ends = [-int(end) if end else np.iinfo(np.int64).max for end in crops[:, 1]]
        inputs = [x.name, self.const(f"{name}/starts", crops[:, 0], np.int64),
                  self.const(f"{name}/ends", ends, np.int64),
                  self.const(f"{name}/axes", list(range(2, 2 + len(crops))), np.int64)]
        return Value(self.node("Slice", inputs, name), x.perm, x.shape)


def _onnx_kernel(kernel: np.ndarray) -> np.ndarray:
    rank = kernel.ndim
    return np.transpose(kernel, (rank - 1, rank - 2, *range(rank - 2)))


def _tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n

