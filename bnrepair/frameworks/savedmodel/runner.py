"""TensorFlow SavedModels (TF2 and TF1): find BN in the saved graph, measure BN inputs, patch the checkpoint.

No model code is needed and nothing is converted: the signature's own graph (functions inlined by
``tf_graph.flatten``) is imported into a ``tf.function`` that returns every BN input reduced on the
device to per-channel (count, mean, M2). Variables are read from the SavedModel's checkpoint into
``tf.Variable``s that the imported graph reads through ``input_map``, so ``set_stats`` is an assign
and eval-mode passes see the new statistics. In ``train`` mode the graph is rewired so that BN
normalises with batch statistics (``graph.rewire_for_batch_statistics``); eval mode's
drift-corrected passes rewire it to the batch statistics carried by corrections that the graph reads from
variables, assigned before each batch (one trace serves the whole pass).

Statistics follow the Keras convention (biased variance, ``unbiased_var=False``) for every SavedModel,
TF1 included: TF's fused training op feeds its moving average a Bessel-corrected batch variance, a
factor n/(n-1) that pooling over a whole calibration set makes negligible.

The writer copies the directory and rewrites only the variables checkpoint, every tensor restored and
saved as stored except the recalibrated moving mean / variance.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ...errors import BnrepairError, InputError
from ...graph import BNLayer, ModelGraph
from ...moments import Moments
from ..tf_graph import VARIABLE_OPS, canonical, freeze, split, subgraph
from ..tf_runtime import data_misfit, held_corrections, import_tensorflow, per_channel
from .files import SavedGraph, same_bytes, trainable_v1
from .graph import Site, correction_inputs, find_bn, no_bn_message, rewire_for_batch_statistics
from .policy import check_graph
from .signature import choose_signature


class SavedModelRunner:
    """``protocols.Runner`` for a saved graph (``files.SavedGraph``: a SavedModel signature, or a TF1 training
    graph standing for one), on the TensorFlow device ``device`` (``tf_runtime.resolve_device``)."""

    def __init__(self, saved: SavedGraph, device: str, trust_code: bool = False):
        self.saved, self.device = saved, device
        self.framework, self.source, self.signature = saved.framework, saved.source, saved.signature
        self.flat, self.reader, self.keys = saved.flat, saved.reader, saved.keys
        model_nodes = self.flat.fanin(self.signature.outputs.values(),
                                      stop={split(t)[0] for t in self.signature.inputs.values()})
        check_graph([self.flat.nodes[n] for n in sorted(model_nodes)], str(self.source), trust_code)
        sites, rejected = find_bn(self.flat, model_nodes)
        if not sites:
            raise InputError(f"{self.source}: " + no_bn_message(self.flat, model_nodes, rejected, saved.where))
        if self.signature.input_name is None:
            self.signature = choose_signature(saved.meta, self.signature.name, self._feeding_input(sites),
                                              str(self.source))
        self._check_feeds(sites)
        objects = saved.objects
        self._names = {key: name for key, name, _ in objects.values()}
        trainable = ({key for key, _, flag in objects.values() if flag} if objects
                     else trainable_v1(saved.meta, self.keys))
        self.sites = dict(zip(_unique_ids(sites, self.keys, self._names), sites))
        self._vars = self._variables(model_nodes)
        self._ranks, self._dtypes = self._probe()
        layers = [self._describe(i, s, trainable) for i, s in self.sites.items()]
        self.graph = ModelGraph(self.framework, str(self.source), layers,
                                input_shape=self.signature.shape[1:] if self.signature.shape else None,
                                batch=self.signature.shape[0] if self.signature.shape else None,
                                channels_first=any(bn.axis == 1 and self._ranks[canonical(s.x)] > 2
                                                   for bn, s in zip(layers, sites)),
                                unbiased_var=False, default_eps=saved.default_eps)
        self._functions: dict = {}
        self._corrections: dict = {}
        """per layer: the variables of the correction a drift-corrected pass carries the batch's statistics by"""

    # --- reading the file ------------------------------------------------------------------------------
    def _check_feeds(self, sites: list[Site]) -> None:
        """The calibration data feeds one input; BN inputs must not need the others."""
        needed = self.flat.fanin([s.x for s in sites], stop={self._input_node})
        others = {split(t)[0]: n for n, t in self.signature.inputs.items() if n != self.signature.input_name}
        used = sorted(name for node, name in others.items() if node in needed)
        if used:
            raise InputError(f"{self.source}: BN layers depend on input(s) {', '.join(used)} of "
                             f"{self.saved.where}, but the calibration data feeds only "
                             f"{self.signature.input_name!r} (--input)"
                             + self.saved.hint)

    def _feeding_input(self, sites: list[Site]) -> str:
        """The one signature input the BN layers depend on: the calibration data's, without --input."""
        inputs = self.signature.inputs
        needed = self.flat.fanin([s.x for s in sites], stop={split(t)[0] for t in inputs.values()})
        used = sorted(name for name, tensor in inputs.items() if split(tensor)[0] in needed)
        if len(used) != 1:
            raise InputError(f"{self.source}: {self.saved.where} takes {len(inputs)} inputs "
                             f"({', '.join(sorted(inputs))}) and its BN layers depend on "
                             f"{', '.join(used) if used else 'none of them'}; name the one the calibration data "
                             "feeds with --input")
        return used[0]

    @property
    def _input_node(self) -> str:
        return split(self.signature.input_tensor)[0]

    def _variables(self, model_nodes: set[str]) -> dict:
        """A ``tf.Variable`` on the device for every variable node the signature reads."""
        tf = import_tensorflow()
        found = {}
        with tf.device(self.device):
            for name in sorted(model_nodes):
                if self.flat.nodes[name].op not in VARIABLE_OPS:
                    continue
                key = self.keys.get(name)
                if key is None or not self.reader.has_tensor(key):
                    raise InputError(f"{self.source}: the signature reads variable {name}, which the checkpoint "
                                     "does not hold")
                found[name] = tf.Variable(self.reader.get_tensor(key), name=name.replace(":", "_"))
        return found

    def _probe(self) -> tuple[dict[str, int], dict[str, int]]:
        """Rank and dtype of every BN input and statistic slot, by importing the graph once (no run)."""
        tf = import_tensorflow()
        sites = list(self.sites.values())
        tensors = [s.x for s in sites] + [self.flat.nodes[slot[0]].input[slot[1]]
                                          for s in sites if not s.fused for slot in (s.mean_slot, s.var_slot)]
        graph_def, _ = self._program(tensors, frozenset(), [self.signature.input_name])
        ranks, dtypes = {}, {}
        with tf.Graph().as_default() as probe:
            tf.graph_util.import_graph_def(graph_def, name="")
            for tensor in tensors:
                t = probe.get_tensor_by_name(canonical(tensor))
                dtypes[canonical(tensor)] = t.dtype.as_datatype_enum
                if t.shape.rank is not None:
                    ranks[canonical(tensor)] = t.shape.rank
        missing = [s.node for s in sites if canonical(s.x) not in ranks]
        if missing:
            raise InputError(f"{self.source}: the rank of the input of BN op(s) {', '.join(missing)} is unknown")
        return ranks, dtypes

    def _describe(self, layer_id: str, site: Site, trainable: set[str]) -> BNLayer:
        mean_key, var_key = self.keys[site.mean_var], self.keys[site.var_var]
        mean, var = self.reader.get_tensor(mean_key), self.reader.get_tensor(var_key)
        affine = [self.keys.get(v) for v in (site.gamma_var, site.beta_var) if v is not None]
        return BNLayer(
            id=layer_id, channels=int(np.size(mean)), axis=site.axis % self._ranks[canonical(site.x)], eps=site.eps,
            momentum=None, center=site.beta_var is not None, scale=site.gamma_var is not None,
            frozen=bool(affine) and not any(k in trainable for k in affine),
            mean=np.array(mean, np.float64).reshape(-1), var=np.array(var, np.float64).reshape(-1),
            locations={"mean": mean_key, "var": var_key}, producer=site.producer[0], producer_kind=site.producer[1],
            kind="FusedBatchNorm" if site.fused else "batch_normalization")

    # --- graphs to run ---------------------------------------------------------------------------------
    def _program(self, fetches: list[str], train: frozenset, feeds: list[str], corrected: frozenset = frozenset()):
        """The GraphDef computing ``fetches`` from the signature inputs ``feeds``, and its variable nodes; the
        BN layers ``train`` normalise with batch statistics, carried by their corrections where ``corrected``."""
        tf = import_tensorflow()
        stops = {split(self.signature.inputs[n])[0]: n for n in feeds}
        keep = self.flat.fanin(fetches, stop=set(stops))
        variables = sorted(keep & set(self._vars))
        placeholders = {name: self.signature.dtypes[feed] for name, feed in stops.items()}
        for name in variables:
            node = self.flat.nodes[name]
            placeholders[name] = tf.resource.as_datatype_enum if node.op == "VarHandleOp" else node.attr["dtype"].type
        graph_def = subgraph(self.flat, keep, placeholders)
        if train:
            graph_def = rewire_for_batch_statistics(graph_def, [self.sites[i] for i in sorted(train - corrected)],
                                                    keep, self._dtypes, self._ranks,
                                                    [self.sites[i] for i in sorted(corrected)])
        return graph_def, variables

    def _input_map(self, feeds: dict, variables: list[str], corrected: frozenset = frozenset()) -> dict:
        tf = import_tensorflow()
        mapping = {canonical(self.signature.inputs[name]): value for name, value in feeds.items()}
        for layer_id in corrected:
            for name, variable in zip(correction_inputs(self.sites[layer_id]), self._corrections[layer_id]):
                mapping[f"{name}:0"] = variable.read_value()
        for name in variables:
            var = self._vars[name]
            # identity captures the eager handle into the function being traced
            resource = self.flat.nodes[name].op == "VarHandleOp"
            mapping[f"{name}:0"] = tf.identity(var.handle) if resource else var.read_value()
        return mapping

    def _input_spec(self, tf):
        shape = self.signature.shape
        return tf.TensorSpec(None if shape is None else (None,) + tuple(shape[1:]),
                             tf.dtypes.as_dtype(self.signature.dtypes[self.signature.input_name]))

    # --- runner protocol ---------------------------------------------------------------------------------
    def infer(self, inputs, mode: str = "eval") -> dict[str, np.ndarray]:
        """The signature outputs that the calibration input alone determines, as numpy, sorted by name;
        ``mode="train"``: BN ops normalise with batch statistics."""
        train = frozenset(self.sites) if mode == "train" else frozenset()
        return {name: t.numpy() for name, t in self._run(inputs, train, [], outputs=True).items()}

    def collect(self, inputs, mode: str, ids: list[str], batch_stats=frozenset(),
                corrections=None) -> dict[str, Moments]:
        shared = [i for i in ids if self.call_counts()[i] > 1]
        if shared:
            raise BnrepairError(f"BN layer(s) {', '.join(shared)} share their statistics variables with another BN "
                                "op in one forward pass; they cannot be recalibrated as one layer")
        train = frozenset(ids) if mode == "train" else frozenset(batch_stats)
        corrected = held_corrections(self._corrections, corrections, self.device)
        results = self._run(inputs, train, ids, outputs=False, corrected=corrected)
        return {layer_id: Moments.of(*(t.numpy() for t in results[layer_id])) for layer_id in ids}

    def call_counts(self) -> dict[str, int]:
        """How many BN ops of the signature use each layer's moving statistics (from the graph alone)."""
        uses = Counter(site.mean_var for site in self.sites.values())
        return {layer_id: uses[site.mean_var] for layer_id, site in self.sites.items()}

    def set_stats(self, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        for layer_id, (mean, var) in stats.items():
            site = self.sites[layer_id]
            for node, value in ((site.mean_var, mean), (site.var_var, var)):
                variable = self._vars[node]
                variable.assign(np.asarray(value).astype(variable.dtype.as_numpy_dtype).reshape(variable.shape))
            bn = self.graph.layer(layer_id)
            bn.mean, bn.var = np.array(mean, np.float64), np.array(var, np.float64)

    def weights(self):
        statistics = {node for site in self.sites.values() for node in (site.mean_var, site.var_var)}
        for name, variable in self._vars.items():
            if name not in statistics and variable.dtype.is_floating:
                yield name, variable.numpy()

    @property
    def model(self):
        """No in-memory model: the runner, which runs the saved graph, stands for it (``export.source``)."""
        return self

    def exporter(self):
        """ONNX export through tf2onnx."""
        from . import export

        return export

    def folder(self):
        """Nothing folds (``export.UNFOLDABLE`` says why)."""
        from .export import UNFOLDABLE

        raise InputError(f"{self.source}: {UNFOLDABLE}")

    def inference_function(self):
        """A ``tf.function`` of the signature outputs ``infer`` gives, with every variable (the statistics held
        now included) a constant, as a converter takes it, and its input spec."""
        tf = import_tensorflow()
        names = self._computable_outputs()
        tensors = [canonical(self.signature.outputs[n]) for n in names]
        graph_def, variables = self._program(tensors, frozenset(), [self.signature.input_name])
        frozen = freeze(graph_def, {name: self._vars[name].numpy() for name in variables})
        spec = self._input_spec(tf)

        @tf.function(input_signature=[spec], autograph=False)
        def run(x):
            results = tf.graph_util.import_graph_def(frozen, input_map={canonical(self.signature.input_tensor): x},
                                                     return_elements=tensors, name="model")
            return dict(zip(names, results))

        return run, spec

    def save(self, output: Path, changed: list[str]) -> None:
        """Copy the SavedModel to ``output`` with only ``changed`` layers' statistics replaced."""
        values = {}
        for layer_id in changed:
            site, bn = self.sites[layer_id], self.graph.layer(layer_id)
            for node, stat in ((site.mean_var, "mean"), (site.var_var, "var")):
                for key in self._aliases(bn.locations[stat]):
                    values[key] = self._vars[node].numpy()
        self.saved.write(Path(output), values)

    def cast_input(self, x):
        tf = import_tensorflow()
        dtype = tf.dtypes.as_dtype(self.signature.dtypes[self.signature.input_name]).as_numpy_dtype
        x = np.asarray(x)
        if np.issubdtype(dtype, np.integer) and np.issubdtype(x.dtype, np.floating) and not np.all(x == np.round(x)):
            raise InputError(f"signature input {self.signature.input_name!r} takes {np.dtype(dtype).name} values, "
                             "but the data are fractional; choose --preprocess raw")
        return x.astype(dtype, copy=False)

    # --- capture -------------------------------------------------------------------------------------------
    def _function(self, train: frozenset, ids: list[str], outputs: bool, corrected: frozenset):
        key = (train, tuple(ids), outputs, corrected)
        if key not in self._functions:
            self._functions[key] = self._trace(import_tensorflow(), train, ids, outputs, corrected)
        return self._functions[key]

    def _run(self, inputs, train: frozenset, ids: list[str], outputs: bool, corrected: frozenset = frozenset()):
        tf = import_tensorflow()
        function = self._function(train, ids, outputs, corrected)
        try:
            with tf.device(self.device):
                return function(inputs)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
            raise data_misfit(exc, inputs) from exc

    def _trace(self, tf, train: frozenset, ids: list[str], outputs: bool, corrected: frozenset):
        """One ``tf.function`` importing the graph: the signature outputs, or the moments of BN inputs."""
        if outputs:
            names = self._computable_outputs()
            tensors = [canonical(self.signature.outputs[n]) for n in names]
        else:
            sites = [self.sites[i] for i in ids]
            tensors = [canonical(s.x) for s in sites]
            axes = [s.axis % self._ranks[t] for s, t in zip(sites, tensors)]
        graph_def, variables = self._program(tensors, train, [self.signature.input_name], corrected)
        present = {node.name for node in graph_def.node}  # a layer after every fetch is left out of the graph
        corrected = frozenset(i for i in corrected if correction_inputs(self.sites[i])[0] in present)

        @tf.function(input_signature=[self._input_spec(tf)], autograph=False)
        def run(x):
            results = tf.graph_util.import_graph_def(
                graph_def, input_map=self._input_map({self.signature.input_name: x}, variables, corrected),
                return_elements=tensors, name="model")
            if outputs:
                return dict(zip(names, results))
            return {i: _moments(tf, t, axis) for i, t, axis in zip(ids, results, axes)}

        return run

    def _computable_outputs(self) -> list[str]:
        others = {split(t)[0] for n, t in self.signature.inputs.items() if n != self.signature.input_name}
        names = [name for name, tensor in sorted(self.signature.outputs.items())
                 if not others & self.flat.fanin([tensor], stop={self._input_node})]
        if not names:
            raise BnrepairError(f"every output of {self.saved.where} needs inputs besides "
                                f"{self.signature.input_name!r}")
        return names

    def _aliases(self, key: str) -> list[str]:
        """``key`` and every other checkpoint entry that is the same variable saved twice.

        Keras 3's ``model.export`` tracks each variable under two objects (``variables/N`` and
        ``_all_variables/M``): same name, same stored bytes. Both must change, or a reload of the
        other object serves the stale statistics."""
        names = self._names
        if key not in names:
            return [key]
        stored = self.reader.get_tensor(key)
        return [other for other, name in names.items()
                if other == key or (name == names[key] and same_bytes(self.reader.get_tensor(other), stored))]


def _moments(tf, x, axis: int):
    """Per-channel (count, mean, M2) of ``x`` over every axis but ``axis``, two-pass, in float32."""
    x = tf.cast(x, tf.float32)
    axes = [i for i in range(x.shape.rank) if i != axis]
    mean = per_channel(tf, tf.reduce_mean, x, axes)
    shape = [1] * x.shape.rank
    shape[axis] = -1
    m2 = per_channel(tf, tf.reduce_sum, tf.square(x - tf.reshape(mean, shape)), axes)
    count = tf.size(x, out_type=tf.int64) // tf.cast(tf.shape(x)[axis], tf.int64)
    return count, mean, m2


def _unique_ids(sites: list[Site], keys: dict[str, str], names: dict[str, str]) -> list[str]:
    """Each BN's own name: the scope of its moving mean (``conv1/BatchNorm``, ``bn1``), else its op name."""
    scopes = []
    for site in sites:
        key = keys.get(site.mean_var, "")
        scopes.append(names.get(key, key).rpartition("/")[0])
    return [scope if scope and scopes.count(scope) == 1 else site.node for scope, site in zip(scopes, sites)]


