"""A SavedModel's variables checkpoint: reading it safely, the variables it holds, rewriting it patched.

TF2 checkpoints carry an object graph that names each variable; TF1 ones are plain saver keys. The writer
copies the SavedModel folder and rewrites only the checkpoint, every tensor restored and saved as stored
except the recalibrated moving mean / variance.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BnrepairError, InputError
from ...options import LoadOptions
from ...writers import replace_folder, scratch_folder, storable
from ..tf_graph import FlatGraph, flatten, split
from ..tf_runtime import import_tensorflow
from .signature import Signature, choose_signature, read_meta_graph

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


@dataclass
class SavedGraph:
    """A saved graph as a wing reads it from its files: what ``runner.SavedModelRunner`` measures, and how the
    statistics are written back. ``read`` makes one of a SavedModel folder; the TF1 wing makes one of a training
    checkpoint and its ``.meta``."""

    source: Path
    framework: str
    meta: Any
    """the MetaGraphDef"""
    signature: Signature
    flat: FlatGraph
    """the graph measured, its functions inlined"""
    reader: CheckpointReader
    keys: dict[str, str]
    """variable node -> checkpoint key"""
    objects: dict
    """``checkpointed_objects`` (TF2 checkpoints only)"""
    write: Callable[[Path, dict], None]
    """``write(output, values)``: the input again at ``output``, the checkpoint entries ``values`` replaced"""
    where: str
    """the graph measured, as messages name it"""
    hint: str = ""
    """what to do about an input the calibration data does not feed, as the end of the message"""
    default_eps: float | None = None


def read(source: Path, options: LoadOptions) -> SavedGraph:
    """The serving signature of the SavedModel folder ``source`` (``--signature``, ``--input``) and its
    variables checkpoint."""
    check_links(source)
    meta = read_meta_graph(source)
    signature = choose_signature(meta, options.signature or "serving_default", options.input_name, str(source))
    saver = [split(meta.saver_def.save_tensor_name)[0]] if meta.saver_def.save_tensor_name else []
    flat = FlatGraph(flatten(meta, [split(t)[0] for t in signature.outputs.values()] + saver))
    reader = CheckpointReader(source, checkpoint_prefix(source))
    objects = checkpointed_objects(meta, reader)
    return SavedGraph(source, "savedmodel", meta, signature, flat, reader,
                      keys={**flat.checkpoint_keys(), **captured_keys(meta, objects)}, objects=objects,
                      write=functools.partial(write_patched, source), where=f"signature {signature.name!r}",
                      default_eps=1e-3)  # Keras's and tf.layers' default, what its BN was most likely built with


def checkpoint_prefix(path: Path) -> Path:
    prefix = Path(path) / "variables" / "variables"
    if not prefix.with_name("variables.index").is_file():
        raise InputError(f"{path}: SavedModel without a variables checkpoint (variables/variables.index); "
                         "a graph with constants only has no BN statistics to patch")
    return prefix


@contextmanager
def readable_checkpoint(source: Path):
    """TensorFlow reports a damaged or truncated variables checkpoint from whichever read meets the damage
    (an OpError, or IndexError for data cut short): the user's file to fix, in one line."""
    tf = import_tensorflow()
    try:
        yield
    except (tf.errors.OpError, IndexError) as exc:
        reason = re.sub(r"\{\{.*?\}\}|\[Op:\w+\]", "", str(exc)).strip().split("\n")[0] or type(exc).__name__
        raise InputError(f"{source}: damaged or truncated variables checkpoint ({reason})") from None


class CheckpointReader:
    """``tf.train.load_checkpoint`` of the checkpoint at ``prefix`` (of the model at ``source``), every read
    guarded by ``readable_checkpoint``."""

    def __init__(self, source: Path, prefix: Path):
        self.source = source
        with readable_checkpoint(source):
            self.reader = import_tensorflow().train.load_checkpoint(str(prefix))

    def keys(self) -> set[str]:
        return set(self.reader.get_variable_to_dtype_map())

    def shapes(self) -> dict[str, list[int]]:
        return self.reader.get_variable_to_shape_map()

    def has_tensor(self, key: str) -> bool:
        return self.reader.has_tensor(key)

    def get_tensor(self, key: str):
        with readable_checkpoint(self.source):
            return self.reader.get_tensor(key)


def same_bytes(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == object:
        return a.tolist() == b.tolist()
    return a.tobytes() == b.tobytes()


def checkpointed_objects(meta, reader) -> dict[int, tuple[str, str, bool]]:
    """TF2: object node id -> (checkpoint key, variable name, trainable) for every saved variable.

    The checkpoint's object graph and the SavedModel's list the same objects under the same ids
    (trainability is only in the latter; taken where the names agree). Empty for TF1 checkpoints."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    if not reader.has_tensor(OBJECT_GRAPH_KEY):
        return {}
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
    saved = meta.object_graph_def.nodes
    found = {}
    for index, node in enumerate(graph.nodes):
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE":
                variable = saved[index].variable if index < len(saved) else None
                trainable = bool(variable is not None and variable.name == attribute.full_name and variable.trainable)
                found[index] = (attribute.checkpoint_key, attribute.full_name, trainable)
    return found


def captured_keys(meta, objects: dict[int, tuple[str, str, bool]]) -> dict[str, str]:
    """TF2: variable node -> checkpoint key, for the variables a top-level function call captures.

    A SavedModel function's captured inputs are the call's last inputs, in the order of its
    ``bound_inputs`` (object ids): the mapping the Python loader itself uses. It beats the saver's
    view where Keras 3 saves wrapper copies of variables instead of the ones the signature reads."""
    functions = meta.object_graph_def.concrete_functions
    keys = {}
    for node in meta.graph_def.node:
        bound = functions[node.attr["f"].func.name].bound_inputs if node.attr["f"].func.name in functions else []
        if not bound:
            continue
        for tensor, obj in zip([i for i in node.input if not i.startswith("^")][-len(bound):], bound):
            if obj in objects:
                keys[split(tensor)[0]] = objects[obj][0]
    return keys


def trainable_v1(meta, keys: dict[str, str]) -> set[str]:
    """TF1: checkpoint keys of the variables in the ``trainable_variables`` collection."""
    from tensorflow.core.framework import variable_pb2

    nodes = set()
    for raw in meta.collection_def["trainable_variables"].bytes_list.value:
        definition = variable_pb2.VariableDef()
        definition.ParseFromString(raw)
        nodes.add(split(definition.variable_name)[0])
    return {key for node, key in keys.items() if node in nodes}


# --- writer --------------------------------------------------------------------------------------------
def check_links(source: Path) -> None:
    """Refuse a SavedModel holding a symbolic link that leads out of its folder: copying it into the output
    would copy whatever it points at (``assets/`` linked to ``/etc/shadow``). Links within stay links."""
    root = source.resolve()
    for folder, dirs, files in os.walk(source):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink() and root not in path.resolve().parents:
                raise InputError(f"{source}: {path.relative_to(source)} is a symbolic link out of the SavedModel "
                                 f"(to {os.readlink(path)}); refusing to read or copy it")


def write_patched(source: Path, dest: Path, values: dict[str, np.ndarray]) -> None:
    """Copy the SavedModel at ``source`` to ``dest`` with the checkpoint entries in ``values`` replaced.

    Every file but the variables checkpoint is copied as is; the checkpoint is restored tensor by tensor
    in its stored dtypes and saved again (``RestoreV2`` / ``SaveV2``), then read back and compared to the
    input, tensor by tensor. Built in a temporary folder beside ``dest`` and renamed into place.
    """
    if dest.exists() and not (dest.is_dir() and (dest / "saved_model.pb").exists()):
        raise BnrepairError(f"{dest}: exists and is not a SavedModel; choose another -o/--output")
    if source.resolve() in dest.resolve().parents:
        raise BnrepairError(f"{dest}: the output cannot lie inside the input SavedModel")
    with scratch_folder(dest) as tmp:
        shutil.copytree(source, tmp, symlinks=True, dirs_exist_ok=True, ignore=_checkpoint_files)
        rewrite_checkpoint(checkpoint_prefix(source), tmp / "variables" / "variables", values)
        replace_folder(tmp, dest)


def _checkpoint_files(folder: str, names: list[str]) -> list[str]:
    if Path(folder).name != "variables":
        return []
    return [n for n in names if n == "variables.index" or n.startswith("variables.data-")]


def rewrite_checkpoint(source: Path, dest: Path, values: dict[str, np.ndarray]) -> None:
    tf = import_tensorflow()
    with readable_checkpoint(source):
        dtypes = tf.train.load_checkpoint(str(source)).get_variable_to_dtype_map()
    keys = sorted(dtypes)
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise BnrepairError(f"{source}: checkpoint has no entries {', '.join(unknown)}")
    with tf.device("/CPU:0"):
        with readable_checkpoint(source):
            stored = tf.raw_ops.RestoreV2(prefix=str(source), tensor_names=keys,
                                          shape_and_slices=[""] * len(keys), dtypes=[dtypes[k] for k in keys])
        tensors = [tf.constant(storable(values[k], dtypes[k].as_numpy_dtype, f"{source}: {k}").reshape(t.shape),
                               dtypes[k]) if k in values else t for k, t in zip(keys, stored)]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tf.raw_ops.SaveV2(prefix=str(dest), tensor_names=keys, shape_and_slices=[""] * len(keys), tensors=tensors)
    written = tf.train.load_checkpoint(str(dest))
    if set(written.get_variable_to_dtype_map()) != set(keys):
        raise BnrepairError(f"{dest}: the rewritten checkpoint lost or gained entries")
    for key, tensor in zip(keys, tensors):
        if not same_bytes(written.get_tensor(key), tensor.numpy()):
            raise BnrepairError(f"{dest}: entry {key} did not read back as written")
