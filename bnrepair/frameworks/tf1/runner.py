"""TF1 training checkpoints: the SavedModel wing's runner, measuring through the training graph of the ``.meta``.

The graph is fixed for inference first (``--feed`` values and the training flag as constants, ``tf.cond``
resolved), then stands in for a signature: its input is the placeholder the BN layers depend on (or
``--input``), its outputs the ``graph.Dataflow`` sinks that pass through BN. From there everything is the
SavedModel wing's: BN sites by op pattern, variables from the checkpoint, moments measured in a
``tf.function`` of the imported graph, ``train`` mode by rewiring the inference BN ops to batch statistics.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...options import LoadOptions
from ..savedmodel.files import CheckpointReader, SavedGraph
from ..savedmodel.graph import find_bn, no_bn_message
from ..savedmodel.runner import SavedModelRunner
from ..savedmodel.signature import Signature
from ..tf_graph import FlatGraph, canonical, flatten, split, subgraph
from ..tf_runtime import import_tensorflow, resolve_device
from . import conditionals, files
from .graph import Dataflow, feed_value, parse_feeds, placeholders, steering, training_flag, with_constants
from .training import decays, inference_form, separate_statistics, updated_by_training

FUNCTIONAL = {"If", "StatelessIf", "While", "StatelessWhile", "PartitionedCall", "StatefulPartitionedCall"}
"""ops of TensorFlow 2's control flow and functions: a graph built by tf.compat.v1 code under TensorFlow 2 uses
them for tf.cond and tf.while_loop; grappler's function optimizer lowers them to TF1's Switch / Merge"""


def load(prefix: Path, options: LoadOptions, device: str) -> SavedModelRunner:
    """The SavedModel wing's runner on the training graph of the checkpoint ``prefix``, read for inference, with
    what the training side says about each layer."""
    device = resolve_device(import_tensorflow(), device)
    training = TrainingGraph(prefix, options)
    runner = SavedModelRunner(training.saved, device, options.trust_code)
    training.describe(runner)
    return runner


class TrainingGraph:
    """A TF1 checkpoint's training graph made a ``SavedGraph`` (``saved``): fixed for inference, its input and
    outputs found, its variables in the checkpoint."""

    hint = "; feed the others with --feed NAME=VALUE"

    def __init__(self, prefix: Path, options: LoadOptions):
        input_name = options.input_name
        self.source = prefix
        meta = files.read_meta(prefix)
        self.trained = FlatGraph(meta.graph_def)
        if any(node.op in FUNCTIONAL for node in meta.graph_def.node):  # compat.v1 code run by TensorFlow 2
            self.trained = FlatGraph(flatten(meta, list(self.trained.nodes)))
        self._saver_file = meta.saver_def.filename_tensor_name
        self.fixed = self._fixed(self.trained, parse_feeds(options.feeds), input_name)
        resolved = FlatGraph(conditionals.resolve(self.fixed))
        reader = CheckpointReader(prefix, prefix)
        keys = resolved.checkpoint_keys()
        lacking = sorted(set(keys.values()) - reader.keys())
        if not keys or lacking:
            why = (f"{len(lacking)} of the {len(keys)} it saves are not in the checkpoint, such as {lacking[0]}"
                   if lacking else "it has no saver")
            raise InputError(f"{prefix}: the graph in {files.meta_path(prefix).name} does not save the checkpoint's "
                             f"variables ({why}; a .meta of another model?)")
        input_name, flow, flat, sites = self._model(resolved, input_name)
        unresolved = steering(flat, flat.fanin([s.x for s in sites], stop={split(input_name)[0]}))
        if unresolved:
            raise InputError(f"{prefix}: the BN layers' tf.cond depends on {', '.join(sorted(unresolved))}, which "
                             "bnrepair cannot tell the value of at inference; give it with --feed NAME=VALUE")
        self.input_node = split(input_name)[0]
        self.saved = SavedGraph(prefix, "tf1", meta, self._signature(flow, flat, sites, input_name), flat, reader,
                                keys=keys, objects={}, write=functools.partial(files.write_patched, prefix),
                                where=self._where(), hint=self.hint)

    def describe(self, runner: SavedModelRunner) -> None:
        """What the training side of the graph says about each of ``runner``'s layers: the decay of its moving
        averages (read off the update ops with the flag True) and, where inference reads statistics no op updates
        while training updates others, the ones it updates (``BNLayer.separate_from``)."""
        shapes = runner.reader.shapes()
        by_node = {node: tuple(shapes.get(key, ())) for node, key in runner.keys.items()}
        separate = separate_statistics(runner.sites, updated_by_training(self.trained, self.input_node),
                                       runner.keys, by_node)
        training = FlatGraph(conditionals.resolve(with_constants(self.fixed, {self._flag: np.array(True)})
                                                  if self._flag else self.fixed))
        decay = decays(training, {s.mean_var for s in runner.sites.values()})
        for bn in runner.graph.bn_layers:
            bn.separate_from = separate.get(bn.id)
            bn.momentum = decay.get(runner.sites[bn.id].mean_var)

    def _where(self) -> str:
        return f"the graph of {files.meta_path(self.source).name}"

    def _fixed(self, flat: FlatGraph, feeds: dict[str, str], input_name: str | None):
        """The graph with the ``--feed`` placeholders and the training flag (False) as constants."""
        saver = flat.fanin([self._saver_file]) if self._saver_file else set()
        found = {name: node for name, node in placeholders(flat).items() if name not in saver}
        unknown = sorted(set(feeds) - set(found))
        if unknown:
            raise InputError(f"{self.source}: --feed {', '.join(unknown)}: no such placeholder; the graph's "
                             f"placeholders: {', '.join(sorted(found)) or 'none'}")
        values = {name: feed_value(text, found[name], str(self.source)) for name, text in feeds.items()}
        flag = training_flag(flat, set(values) | ({split(input_name)[0]} if input_name else set()), str(self.source))
        if flag is not None:
            values[flag] = feed_value("false", found[flag], str(self.source))
        self._flag = flag
        return with_constants(flat.graph_def, values)

    def _model(self, resolved: FlatGraph, input_name: str | None):
        """The input (``input_name``, else the one placeholder through which BN layers are computed), the
        ``Dataflow`` from it over the whole graph, the graph of what that input alone computes (no loss,
        gradients, optimizer or saver), and the BN sites in it. A graph with BN in training form only is measured
        in its ``inference_form``."""
        candidates = [input_name] if input_name else sorted(
            n for n, node in placeholders(resolved).items() if node.op != "PlaceholderWithDefault")
        if input_name and split(input_name)[0] not in resolved.nodes:
            raise InputError(f"{self.source}: --input {input_name}: the graph has no such tensor")
        found, rejected = self._computed_from(resolved, candidates)
        converted = None if found else inference_form(resolved)
        if converted is not None:
            resolved = FlatGraph(converted)
            found, _ = self._computed_from(resolved, candidates)
        if len(found) == 1:
            return found[0]
        if found:
            raise InputError(f"{self.source}: BN layers are computed from each of {', '.join(f[0] for f in found)}; "
                             "name the tensor the calibration data feeds with --input")
        anywhere, _ = find_bn(resolved, set(resolved.nodes))
        needed = sorted(set(placeholders(resolved)) & resolved.fanin([s.x for s in anywhere]) - {input_name})
        if not needed:
            raise InputError(f"{self.source}: " + no_bn_message(resolved, set(resolved.nodes), rejected,
                                                                self._where()))
        if input_name:
            raise InputError(f"{self.source}: the BN layers depend on placeholder(s) {', '.join(needed)} besides "
                             f"{input_name}; give their values with --feed NAME=VALUE")
        raise InputError(f"{self.source}: the BN layers depend on placeholders {', '.join(needed)}; name the one "
                         "the calibration data feeds with --input" + self.hint)

    @staticmethod
    def _computed_from(resolved: FlatGraph, candidates: list[str]):
        """(input, its ``Dataflow``, the graph it alone computes, BN sites there) for each candidate input computing
        BN, and the candidate BN ops that were not BN sites."""
        found, rejected = [], []
        for candidate in candidates:
            flow = Dataflow(resolved, split(candidate)[0])
            flat = FlatGraph(subgraph(resolved, {n for n in resolved.nodes if n not in flow.blocked}, {}))
            sites, not_bn = find_bn(flat, set(flat.nodes))
            rejected += not_bn
            if sites:
                found.append((candidate, flow, flat, sites))
        return found, rejected

    def _signature(self, flow: Dataflow, flat: FlatGraph, sites, input_name: str) -> Signature:
        """The model graph ``flat`` as a signature: its input, and the outputs computed through BN (``flow``: the
        dataflow from that input over the whole graph)."""
        node = split(input_name)[0]
        tensor = canonical(input_name)
        site_nodes = {s.node for s in sites}
        sinks = [canonical(n) for n in flow.sinks() if flat.fanin([n], stop={node}) & site_nodes]
        types = _types(flat.graph_def, [tensor] + sinks)
        outputs = [split(t)[0] for t in sinks if types[t][0].is_floating]
        if not outputs:
            raise InputError(f"{self.source}: nothing the graph computes from {input_name} alone passes through "
                             "BN (do its other inputs need --feed NAME=VALUE?)")
        unfed = flow.settings_needed(outputs)
        if unfed:
            raise InputError(f"{self.source}: the model's output goes on through placeholder(s) "
                             f"{', '.join(unfed)}; give their inference values with --feed NAME=VALUE "
                             "(keep_prob=1 for dropout)")
        dtype, shape = types[tensor]
        return Signature("graph", {input_name: tensor}, {input_name: dtype.as_datatype_enum},
                         {n: canonical(n) for n in outputs}, input_name, shape)



def _types(graph_def, tensors: list[str]) -> dict:
    """``tf.DType`` and shape (None: unknown rank) of each tensor, by importing the graph (nothing runs)."""
    tf = import_tensorflow()
    with tf.Graph().as_default() as probe:
        tf.graph_util.import_graph_def(graph_def, name="")
        found = {}
        for tensor in tensors:
            t = probe.get_tensor_by_name(tensor)
            found[tensor] = t.dtype.base_dtype, None if t.shape.rank is None else tuple(t.shape.as_list())
    return found
