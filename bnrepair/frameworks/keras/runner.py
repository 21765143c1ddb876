"""Keras 3 (TensorFlow backend): load ``.h5`` / ``.keras``, measure BN inputs, write patched files.

BN inputs are captured by wrapping each BN layer's ``call`` on the instance while one
``tf.function`` is traced: the wrapper reduces its input to per-channel (count, mean, M2) on the
device and, in ``train`` mode, normalises with those batch statistics itself, so the moving
averages are never touched and every other layer (Dropout!) runs in inference mode.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import numpy as np

from ...drift import corrected
from ...errors import BnrepairError, InputError, NoBatchNorm, first_line
from ...graph import BNLayer, ModelGraph
from ...moments import Moments
from ...options import LoadOptions
from ..tf_runtime import data_misfit, held_corrections, import_keras, per_channel, resolve_device
from . import files as keras_files


def load_custom_objects(path: Path | None) -> dict:
    """Run the user's module (an explicit opt-in) and collect the Keras classes it defines."""
    if path is None:
        return {}
    keras, _ = import_keras()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: --custom-objects file not found")
    spec = importlib.util.spec_from_file_location(f"bnrepair_custom_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"{path}: importing custom objects failed: {type(exc).__name__}: {exc}") from None
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, (keras.layers.Layer, keras.Model))}


def load_file(path: Path, options: LoadOptions, device: str = "auto") -> "KerasRunner":
    keras, _ = import_keras()
    path, unsafe = Path(path), options.unsafe
    kind = keras_files.file_kind(path)
    objects = load_custom_objects(options.custom_objects)
    try:
        with keras_files.keras_name(path, kind) as readable:
            model = keras.models.load_model(readable, custom_objects=objects, compile=False, safe_mode=not unsafe)
    except Exception as exc:
        message = keras_reason(exc)
        missing = re.search(r"Could not locate class '([^']+)'|Unknown layer: '([^']+)'", str(exc))  # .keras, .h5
        if missing:
            message = (f"the file uses a layer class Keras does not know, {missing.group(1) or missing.group(2)!r}; "
                       "give the Python file that defines it with --custom-objects FILE.py")
        elif "Lambda" in str(exc) or "lambda" in str(exc):
            message += " (the file holds Python code; pass --unsafe only if you trust it)"
        elif "safe_mode" in str(exc):
            message += " (Keras's safe_mode refused it; --unsafe turns safe_mode off, only for a file you trust)"
        raise InputError(f"{path}: Keras could not load the model: {message}") from None
    runner = KerasRunner(model, device=device, source=path, file_kind=kind)
    runner.locate_in_file()
    return runner


def keras_reason(exc: BaseException) -> str:
    """What is wrong, in one line. Keras wraps the reason in generic "could not be deserialized properly"
    paragraphs, each ending "Exception encountered: <the next>"; the innermost says it (an unknown argument,
    a missing class)."""
    inner = str(exc).rsplit("Exception encountered:", 1)[-1]
    return first_line(inner) if inner.strip() else first_line(exc)


def _bn_layers(model):
    """BatchNormalization layers in forward order, nested models and sub-layers included."""
    keras, _ = import_keras()
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found


def _producer(layer):
    try:
        history = layer._inbound_nodes[0].arguments.keras_tensors[0]._keras_history
        op = history.operation
    except (AttributeError, IndexError):
        return None, None
    if type(op).__name__ == "InputLayer":
        return None, None
    return op.name, type(op).__name__


def _unique_ids(layers) -> list[str]:
    names = [layer.name for layer in layers]
    return [layer.path.rsplit("/", 1)[0] if names.count(layer.name) > 1 else layer.name for layer in layers]


class KerasRunner:
    """``protocols.Runner`` for a Keras model."""

    framework = "keras"

    def __init__(self, model, device: str = "auto", source: Path | None = None, file_kind: str | None = None):
        keras, tf = import_keras()
        self.model = model
        self.source = source
        self.file_kind = file_kind
        self.device = resolve_device(tf, device)
        self._bn = _bn_layers(model)
        if not self._bn:
            raise NoBatchNorm(f"{source or 'model'}: the model has no BatchNormalization layers")
        for layer in self._bn:
            if not layer.built:
                raise InputError(f"{source or 'model'}: layer {layer.name} is not built; call the model once first")
        self._by_id = dict(zip(_unique_ids(self._bn), self._bn))
        layers = [self._describe(layer_id, layer) for layer_id, layer in self._by_id.items()]
        self.graph = ModelGraph("keras", str(source or "memory"), layers,
                                input_shape=_input_shape(model), batch=_fixed_batch(model),
                                channels_first=_channels_first(model),
                                unbiased_var=False, default_eps=1e-3)
        captures = _captures(model)
        self._functions: dict = captures["functions"]
        self._sink: dict = captures["sink"]
        self._corrections: dict = captures["corrections"]
        """per layer: the variables of the correction a drift-corrected pass carries the batch's statistics by"""

    def weights(self):
        statistics = {id(v) for layer in self._by_id.values() for v in (layer.moving_mean, layer.moving_variance)}
        for variable in self.model.weights:
            if id(variable) not in statistics:
                yield variable.path, variable.numpy()

    def exporter(self):
        from . import fold

        return fold

    def folder(self):
        from . import fold

        return fold

    def _describe(self, layer_id: str, layer) -> BNLayer:
        producer, producer_kind = _producer(layer)
        return BNLayer(
            id=layer_id, channels=int(layer.moving_mean.shape[0]), axis=int(layer.axis),
            eps=float(layer.epsilon), momentum=float(layer.momentum), center=bool(layer.center),
            scale=bool(layer.scale), frozen=not layer.trainable,
            mean=np.array(layer.moving_mean.numpy(), np.float64),
            var=np.array(layer.moving_variance.numpy(), np.float64),
            producer=producer, producer_kind=producer_kind,
            kind="BatchNormalization(renorm)" if getattr(layer, "renorm", False) else "BatchNormalization")

    # --- where the statistics live in the file -------------------------------------------------
    def locate_in_file(self) -> None:
        """Fill ``BNLayer.locations`` with the dataset paths and check they hold what Keras loaded."""
        with keras_files.open_weights(self.source, self.file_kind) as f:
            paths = _legacy_paths(self.model, f) if self.file_kind == "h5" else _keras_v3_paths(self.model)
            for bn in self.graph.bn_layers:
                layer = self._by_id[bn.id]
                for stat, var in (("mean", layer.moving_mean), ("var", layer.moving_variance)):
                    location = paths.get(id(var))
                    if location is None:
                        raise InputError(f"{self.source}: cannot find where {bn.id}'s {stat} is stored")
                    keras_files.check_dataset(f, location, np.asarray(var.numpy()), str(self.source))
                    bn.locations[stat] = location

    # --- runner protocol ---------------------------------------------------------------------------
    def infer(self, inputs, mode: str = "eval"):
        """The model's outputs as numpy; ``mode="train"``: BN layers use batch statistics, nothing else does."""
        ids = [bn.id for bn in self.graph.bn_layers]
        return self._run(inputs, frozenset(ids) if mode == "train" else frozenset(), ids, outputs=True)

    def collect(self, inputs, mode: str, ids: list[str], batch_stats=frozenset(),
                corrections=None) -> dict[str, Moments]:
        train = frozenset(ids) if mode == "train" else frozenset(batch_stats)
        corrected = held_corrections(self._corrections, corrections, self.device)
        results = self._run(inputs, train, ids, outputs=False, corrected=corrected)
        pooled = {}
        for layer_id in ids:  # a layer called more than once per forward pools its calls, as training would
            calls = [Moments.of(count.numpy(), shift.numpy().astype(np.float64) + offset.numpy(), m2.numpy())
                     for count, shift, offset, m2 in results[layer_id]]
            pooled[layer_id] = functools.reduce(Moments.merge, calls)
        return pooled

    def _run(self, inputs, train: frozenset, ids: list[str], outputs: bool, corrected: frozenset = frozenset()):
        """One traced forward pass; the ``train`` layers normalise with batch statistics (plus the
        ``corrected`` ones' corrections)."""
        key = (train, tuple(ids), outputs, corrected, _signature(inputs))
        if key not in self._functions:
            self._functions[key] = self._capture_function(ids, outputs, inputs)
        _, tf = import_keras()
        try:
            corrections = {i: self._corrections[i] for i in corrected}
            with tf.device(self.device), _patched(self._by_id, ids, train, self._sink, corrections):
                results = self._functions[key](inputs)
        except BnrepairError:
            raise
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
            raise data_misfit(exc, inputs) from exc
        if outputs:
            return tf.nest.map_structure(lambda t: t.numpy(), results)
        return results

    def call_counts(self) -> dict[str, int]:
        """How often each BN layer is called in the model's graph (from its config, no computation)."""
        return {layer_id: len(layer._inbound_nodes) for layer_id, layer in self._by_id.items()}

    def set_stats(self, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        for layer_id, (mean, var) in stats.items():
            layer = self._by_id[layer_id]
            layer.moving_mean.assign(np.asarray(mean, layer.moving_mean.dtype))
            layer.moving_variance.assign(np.asarray(var, layer.moving_variance.dtype))
            bn = self.graph.layer(layer_id)
            bn.mean, bn.var = np.array(mean, np.float64), np.array(var, np.float64)

    def save(self, output: Path, changed: list[str]) -> None:
        """Write the input file again with only ``changed`` layers' statistics replaced."""
        if self.source is None:
            raise InputError("an in-memory model has no file to write; call model.save() yourself")
        values = {}
        for layer_id in changed:
            layer, bn = self._by_id[layer_id], self.graph.layer(layer_id)
            values[bn.locations["mean"]] = layer.moving_mean.numpy()
            values[bn.locations["var"]] = layer.moving_variance.numpy()
        keras_files.write_patched(self.source, Path(output), self.file_kind, values)

    def cast_input(self, x):
        return np.asarray(x, np.float32) if isinstance(x, np.ndarray) and x.dtype == np.float64 else x

    # --- capture ----------------------------------------------------------------------------------
    def _capture_function(self, ids: list[str], outputs: bool, example):
        """One traced forward pass; while tracing, the patched BN calls fill ``self._sink``.

        An array input gets a signature with an open batch dimension, so the final short batch
        reuses the same trace instead of tracing again.
        """
        _, tf = import_keras()
        sink = self._sink
        signature = None
        if hasattr(example, "shape") and hasattr(example, "dtype"):
            signature = [tf.TensorSpec([None, *example.shape[1:]], tf.as_dtype(example.dtype))]

        @tf.function(input_signature=signature, reduce_retracing=signature is None)
        def run(x):
            sink.clear()
            result = self.model(x, training=False)
            missing = [i for i in ids if i not in sink]
            if missing:
                raise BnrepairError(f"the forward pass never reached BN layer(s) {', '.join(missing)}")
            return result if outputs else {i: sink[i] for i in ids}

        return run


def _captures(model) -> dict:
    """What measuring ``model`` builds once and every later call on the same model reuses, as
    ``swa_utils.update_bn`` is called once per epoch: the traced functions, the sink their traces fill and the
    corrections' variables they read. Kept on the model itself (past Keras's attribute tracking), so it goes with
    the model; a new model, or a batch of another shape or dtype, traces anew."""
    captures = getattr(model, "_bnrepair_captures", None)
    if captures is None:
        captures = {"functions": {}, "sink": {}, "corrections": {}}
        object.__setattr__(model, "_bnrepair_captures", captures)
    return captures


def _signature(inputs):
    """What a traced function's input signature depends on: an array's shape past the batch axis and dtype."""
    if hasattr(inputs, "shape") and hasattr(inputs, "dtype"):
        return tuple(inputs.shape[1:]), str(inputs.dtype)
    return None


def _capture_call(layer, original_call, mode: str, sink: dict, layer_id: str, correction=None):
    """A stand-in for ``layer.call`` that records the input's per-channel moments; in train mode it
    normalises with the batch's statistics, carried by ``correction`` (``drift.corrected``) when given."""
    _, tf = import_keras()

    def call(inputs, training=None, mask=None, **kwargs):
        x = tf.cast(inputs, tf.float32)
        axis = layer.axis % len(x.shape)
        shape = [1] * len(x.shape)
        shape[axis] = -1
        # reduced around one sample's values, within a few std of the mean: float32 then errs by eps x std,
        # not eps x |mean| (activations whose mean dwarfs their spread, as in Inception); BN's output does not
        # depend on the shift
        begin, size = [0] * len(x.shape), list(shape)
        shift = tf.slice(x, begin, size)
        if (mode == "train" and correction is None and mask is None and len(x.shape) == 4 and axis in (1, 3)
                and layer.epsilon >= _FUSED_MIN_EPSILON):
            out, (count, offset, m2) = _fused_train_call(layer, x - shift, axis)
            sink.setdefault(layer_id, []).append((count, tf.reshape(shift, [-1]), offset, m2))
            return tf.cast(out, inputs.dtype)
        axes = [i for i in range(len(x.shape)) if i != axis]
        centred = x - shift
        if mask is None:
            offset = per_channel(tf, tf.reduce_mean, centred, axes)
            m2 = per_channel(tf, tf.reduce_sum, tf.square(centred - tf.reshape(offset, shape)), axes)
            count = tf.size(x, out_type=tf.int64) // tf.cast(tf.shape(x)[axis], tf.int64)
        else:  # masked (padded) positions are left out, as Keras's BN does: its mask gains the channel axis last
            weight = tf.expand_dims(tf.cast(mask, tf.float32), -1)
            total = tf.reduce_sum(weight * tf.ones_like(x[..., :1]))
            offset = tf.reduce_sum(weight * centred, axis=axes) / tf.maximum(total, 1.0)
            m2 = tf.reduce_sum(weight * tf.square(centred - tf.reshape(offset, shape)), axis=axes)
            count = tf.cast(total, tf.int64)
        sink.setdefault(layer_id, []).append((count, tf.reshape(shift, [-1]), offset, m2))
        mean = tf.reshape(shift, [-1]) + offset
        if mode != "train":
            return original_call(inputs, training=False, mask=mask, **kwargs)
        var = m2 / tf.cast(tf.maximum(count, 1), tf.float32)
        if correction is not None:
            mean, var = corrected(mean, var, correction, layer.epsilon)
        inv = tf.math.rsqrt(var + layer.epsilon)
        if layer.scale:
            inv = inv * tf.cast(layer.gamma, tf.float32)
        offset = -mean * inv
        if layer.center:
            offset = offset + tf.cast(layer.beta, tf.float32)
        out = x * tf.reshape(inv, shape) + tf.reshape(offset, shape)
        return tf.cast(out, inputs.dtype)

    return call


_FUSED_MIN_EPSILON = 1.001e-5  # the fused kernel silently raises a smaller epsilon to this


def _fused_train_call(layer, x, axis: int):
    """Train-mode BN of a 4-D input in one fused kernel (oneDNN on CPU, cuDNN on GPU): the output and
    the batch's (count, mean, M2). Separate reductions and element-wise ops made a MobileNetV2 pass
    1.4-1.6x as slow as inference on CPU; the fused kernel runs about as fast as inference."""
    _, tf = import_keras()
    channels = int(x.shape[axis])
    scale = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels])
    offset = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels])
    out, mean, var = tf.compat.v1.nn.fused_batch_norm(x, scale, offset, epsilon=layer.epsilon, is_training=True,
                                                      data_format="NCHW" if axis == 1 else "NHWC")
    count = tf.size(x, out_type=tf.int64) // channels
    # the kernel returns the unbiased variance, m2 / (n - 1), and 0 when n == 1
    m2 = var * tf.cast(tf.maximum(count - 1, 1), tf.float32)
    return out, (count, mean, m2)


class _patched:
    """Swap the chosen layers' ``call`` for capturing ones while a forward pass is traced."""

    def __init__(self, by_id: dict, ids: list[str], train: frozenset, sink: dict, corrections: dict):
        self.targets = [(by_id[i], i) for i in ids]
        self.train, self.sink, self.corrections = train, sink, corrections

    def __enter__(self):
        for layer, layer_id in self.targets:
            mode = "train" if layer_id in self.train else "eval"
            layer.call = _capture_call(layer, type(layer).call.__get__(layer), mode, self.sink, layer_id,
                                       self.corrections.get(layer_id))

    def __exit__(self, *exc):
        for layer, _ in self.targets:
            layer.__dict__.pop("call", None)


def _input_shape(model, batch: bool = False):
    """The first input's declared shape, without its batch dimension unless ``batch``; None where unknown."""
    try:
        shape = model.inputs[0].shape
    except (AttributeError, IndexError, TypeError):
        return None
    return tuple(None if d is None else int(d) for d in shape[0 if batch else 1:])


def _fixed_batch(model) -> int | None:
    shape = _input_shape(model, batch=True)
    return shape[0] if shape else None


def _channels_first(model) -> bool:
    for layer in model._flatten_layers(include_self=False, recursive=True):
        fmt = getattr(layer, "data_format", None)
        if fmt in ("channels_first", "channels_last"):
            return fmt == "channels_first"
    return False


def _legacy_paths(model, f) -> dict[int, str]:
    """variable id -> dataset path in a legacy HDF5 file, from each layer group's ``weight_names``."""
    paths = {}
    groups = f.get("model_weights", f)
    for layer in model.layers:
        if layer.name not in groups:
            continue
        names = [n.decode() if isinstance(n, bytes) else str(n)
                 for n in groups[layer.name].attrs.get("weight_names", [])]
        weights = layer.trainable_weights + layer.non_trainable_weights
        if len(names) != len(weights):
            continue
        for var, name in zip(weights, names):
            paths[id(var)] = f"{groups.name.strip('/')}/{layer.name}/{name}".lstrip("/")
    return paths


def _keras_v3_paths(model) -> dict[int, str]:
    """variable id -> dataset path in a ``.keras`` weights file, named by Keras's own saveable walk."""
    from keras.src.saving import saving_lib

    store = saving_lib.NpzIOStore(None, mode="w")
    saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="",
                           visited_saveables=set())
    paths = {}
    for inner, variables in store.contents.items():
        group = "vars" if inner == "__root__" else f"{inner}/vars"
        for index, var in variables.items():
            paths[id(var)] = f"{group}/{index}"
    return paths

