"""ONNX: measure BN inputs in onnxruntime (CUDA when usable, else CPU), write back only BN statistics.

One session per set of layers that normalise with batch statistics, over ``graph.measuring_copy``: the
statistics are fed as inputs each run, so setting them costs nothing, and each BN input's per-channel batch
moments come back (float32 within a batch, merged across batches in float64). The model's own outputs come
first, so ``infer`` is the same session.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np

from ...drift import PARTS
from ...errors import BnrepairError, InputError, NoBatchNorm, first_line
from ...graph import BNLayer, ModelGraph
from ...moments import Moments
from ...options import LoadOptions, on_gpu
from . import files
from .graph import (
    MOMENTS,
    array,
    copied,
    fanin,
    find_bn,
    measuring_copy,
    moment_type,
    pruned,
    set_initializers,
    tag,
    tensor_types,
)
from .values import owned


def load_file(path: Path, options: LoadOptions, device: str = "auto") -> "OnnxRunner":
    model, external = files.read(Path(path))
    model, _ = owned(model)  # values held in constant subgraphs become the BN layers' own initializers
    return OnnxRunner(model, device, source=Path(path), external=external, input_name=options.input_name)


def channels_first(shape: tuple) -> bool:
    """The input's layout, which ONNX does not record: images exported from Keras keep (H, W, C), from torch
    (C, H, W). Channels last when the last axis is a channel count (1, 3 or 4) and the first is not."""
    if len(shape) < 2:
        return False
    return not (shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4))


class OnnxRunner:
    """``protocols.Runner`` for an ONNX ModelProto."""

    framework = "onnx"

    def __init__(self, model, device: str = "auto", source: Path | None = None, external: bool = False,
                 input_name: str | None = None):
        from ..onnx_runtime import cuda_usable, import_ort

        self.ort = import_ort()
        self.proto, self.source, self.external = model, source, external
        """the ModelProto as read (or as passed, which then takes the new statistics)"""
        origin = str(source) if source else "model"
        gpu = on_gpu(device, device != "cpu" and cuda_usable(), "onnxruntime sees no usable CUDA device")
        self.device = "cuda" if gpu else "cpu"
        sites, left = find_bn(model)
        if not sites:
            raise NoBatchNorm(f"{origin}: the model has no BatchNormalization node with stored statistics"
                              + (f" ({'; '.join(f'{i}: {why}' for i, why in left)})" if left else
                                 " (tf2onnx, and torch's dynamo exporter when it optimises, fold BN into the "
                                 "convolutions themselves: export the checkpoint unfolded to repair it)"))
        self._sites = {site.id: site for site in sites}
        self._stats = {s.id: (array(model, s.mean), array(model, s.var)) for s in sites}
        self._input, self._others = self._data_input(input_name)
        layers = [BNLayer(id=s.id, channels=int(self._stats[s.id][0].size), axis=1, eps=s.eps, momentum=s.momentum,
                          center=True, scale=True, frozen=False, mean=self._stats[s.id][0].astype(np.float64),
                          var=self._stats[s.id][1].astype(np.float64), locations={"mean": s.mean, "var": s.var},
                          producer=s.producer, producer_kind=s.producer_kind) for s in sites]
        dims = self._input.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[1:])
        fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        self.graph = ModelGraph("onnx", origin, layers, input_shape=shape or None, batch=fixed,
                                channels_first=channels_first(shape), left_alone=list(left))
        self._outputs = self._computable([o.name for o in model.graph.output], [s.x for s in sites])
        self._sessions: dict = {}
        self._current = None  # ``model``, made on demand

    @functools.cached_property
    def _types(self):
        """The BN inputs' rank and element type, which measuring needs (inspect does not): shape inference runs
        once, when first asked."""
        return tensor_types(self.proto, [s.x for s in self._sites.values()])

    def _data_input(self, name: str | None):
        """The graph input the data feeds (``--input`` where there are several), and the others' names."""
        stored = {init.name for init in self.proto.graph.initializer}
        inputs = [i for i in self.proto.graph.input if i.name not in stored]
        names = ", ".join(i.name for i in inputs)
        if name is None and len(inputs) != 1:
            raise InputError(f"{self.source or 'model'}: the graph takes {len(inputs)} inputs ({names}); name the "
                             "one the calibration data feeds with --input")
        chosen = next((i for i in inputs if name in (None, i.name)), None)
        if chosen is None:
            raise InputError(f"{self.source or 'model'}: the graph has no input {name!r} (--input); its inputs: "
                             f"{names}")
        return chosen, {i.name for i in inputs} - {chosen.name}

    def _computable(self, outputs: list[str], bn_inputs: list[str]) -> list[str]:
        """The model outputs that the data input alone determines; the BN layers must need no other input
        (onnxruntime wants every input a computation reads, and the data feeds one)."""
        if not self._others:
            return outputs
        _, read = fanin(self.proto, bn_inputs)
        if read & self._others:
            raise InputError(f"{self.source or 'model'}: BN layers depend on graph input(s) "
                             f"{', '.join(sorted(read & self._others))}, but the calibration data feeds only "
                             f"{self._input.name!r} (--input)")
        return [o for o in outputs if not fanin(self.proto, [o])[1] & self._others]

    # --- runner protocol -------------------------------------------------------------------------------
    def cast_input(self, x):
        from onnx import helper

        dtype = helper.tensor_dtype_to_np_dtype(self._input.type.tensor_type.elem_type)
        return np.asarray(x).astype(dtype, copy=False)

    def _session(self, batch_stats: frozenset, corrected: frozenset):
        key = batch_stats, corrected
        if key not in self._sessions:
            copy = measuring_copy(self.proto, list(self._sites.values()), batch_stats, self._types, corrected)
            if self._others:  # only what the data input determines, so the other inputs need no feed
                copy = pruned(copy, self._outputs + [f"{tag(s)}/{m}" for s in self._sites.values() for m in MOMENTS])
            providers = ["CPUExecutionProvider"]
            if self.device == "cuda":
                providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
            options = self.ort.SessionOptions()
            options.log_severity_level = 3  # errors only: its notes on the rewritten copy are not the user's
            try:
                self._sessions[key] = self.ort.InferenceSession(copy.SerializeToString(), options,
                                                                providers=providers)
            except Exception as exc:
                raise InputError(f"{self.source or 'model'}: onnxruntime cannot run the model: "
                                 f"{first_line(exc)}") from None
        return self._sessions[key]

    def _run(self, inputs, batch_stats: frozenset, names: list[str], corrections=None) -> list[np.ndarray]:
        from onnx import helper

        feeds = {self._input.name: self.cast_input(inputs)}
        for site in self._sites.values():
            feeds[site.mean], feeds[site.var] = self._stats[site.id]
        for layer_id, parts in (corrections or {}).items():
            dtype = helper.tensor_dtype_to_np_dtype(moment_type(self._types[self._sites[layer_id].x]))
            for part, value in zip(PARTS, parts):
                feeds[f"{tag(self._sites[layer_id])}/correction_{part}"] = np.asarray(value, dtype).ravel()
        session = self._session(batch_stats, frozenset(corrections or ()))
        if self._others:  # a pruned copy reads fewer statistics: onnxruntime refuses a feed it does not take
            taken = {i.name for i in session.get_inputs()}
            feeds = {name: value for name, value in feeds.items() if name in taken}
        try:
            return session.run(names, feeds)
        except Exception as exc:  # a batch of another shape or type
            raise InputError(f"the model does not run on a batch of shape {np.shape(inputs)}: "
                             f"{first_line(exc)}") from None

    def infer(self, inputs, mode: str = "eval"):
        if not self._outputs:
            raise BnrepairError(f"{self.source or 'model'}: every output of the graph needs inputs besides "
                                f"{self._input.name!r}")
        batch_stats = frozenset(self._sites) if mode == "train" else frozenset()
        outputs = self._run(inputs, batch_stats, self._outputs)
        return outputs[0] if len(outputs) == 1 else dict(zip(self._outputs, outputs))

    def collect(self, inputs, mode: str, ids: list[str], batch_stats=frozenset(), corrections=None):
        train = frozenset(ids) if mode == "train" else frozenset(batch_stats)
        names = [f"{tag(self._sites[i])}/{moment}" for i in ids for moment in MOMENTS]
        values = iter(self._run(inputs, train, names, corrections))
        found = {}
        for i in ids:
            mean, var, size = next(values), next(values), next(values)
            count = int(size) // mean.size
            found[i] = Moments.of(count, mean.ravel(), np.asarray(var, np.float64).ravel() * count)
        return found

    def set_stats(self, stats) -> None:
        for layer_id, (mean, var) in stats.items():
            stored_mean, stored_var = self._stats[layer_id]
            self._stats[layer_id] = (np.asarray(mean).astype(stored_mean.dtype).reshape(stored_mean.shape),
                                     np.asarray(var).astype(stored_var.dtype).reshape(stored_var.shape))
            bn = self.graph.layer(layer_id)
            bn.mean, bn.var = np.array(mean, np.float64), np.array(var, np.float64)
        self._current = None
        if self.source is None:  # a ModelProto passed in memory holds the statistics, as a module would
            set_initializers(self.proto, self._stat_values(stats))

    def _stat_values(self, ids) -> dict[str, np.ndarray]:
        """The statistics held now, by the initializer that stores each."""
        return {name: value for i in ids for name, value in zip((self._sites[i].mean, self._sites[i].var),
                                                                self._stats[i])}

    def call_counts(self) -> dict[str, int]:
        uses = Counter(site.mean for site in self._sites.values())
        return {i: uses[site.mean] for i, site in self._sites.items()}

    def weights(self):
        from onnx import numpy_helper

        statistics = {name for site in self._sites.values() for name in (site.mean, site.var)}
        for init in self.proto.graph.initializer:
            if init.name not in statistics:
                yield init.name, numpy_helper.to_array(init)

    def save(self, output: Path, changed: list[str]) -> None:
        if self.source is None:
            raise InputError("an in-memory ONNX model has no file to write; give a path to recalibrate")
        values = {}
        for layer_id in changed:
            site, bn = self._sites[layer_id], self.graph.layer(layer_id)
            values[site.mean], values[site.var] = bn.mean, bn.var
        files.write(self.proto, self.source, Path(output), values, self.external)

    @property
    def model(self):
        """The model with the statistics held now (what ``fold`` and ``export`` start from), made once per set
        of statistics."""
        if self._current is None:
            self._current = copied(self.proto)
            set_initializers(self._current, self._stat_values(self._sites))
        return self._current

    def exporter(self):
        from . import fold

        return fold

    def folder(self):
        from . import fold

        return fold
