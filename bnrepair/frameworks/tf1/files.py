"""The files of a TF1 training checkpoint: which one a path means, its ``.meta``, and writing a patched copy.

``tf.train.Saver`` writes ``PREFIX.index`` and ``PREFIX.data-NNNNN-of-MMMMM`` (the variables), ``PREFIX.meta``
(the graph) and, in the folder, a ``checkpoint`` file naming the latest prefix and those kept. A user may name
the prefix, one of its files, or the folder (its ``checkpoint`` file's latest, or ``--step N``).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ...errors import BnrepairError, InputError
from ...writers import scratch_folder
from ..savedmodel.files import rewrite_checkpoint
from ..tf_runtime import import_tensorflow

SUFFIXES = (".index", ".meta")
STATE = "checkpoint"
"""the folder's checkpoint-state file (``tf.train.get_checkpoint_state``)"""


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` names a TF1 checkpoint: a prefix with an ``.index``, one of its files, or a folder with a
    ``checkpoint`` file (and no ``saved_model.pb``)."""
    path = Path(path)
    if path.is_dir():
        return (path / STATE).is_file() and not (path / "saved_model.pb").exists()
    if path.suffix in SUFFIXES or re.search(r"\.data-\d+-of-\d+$", path.name):
        return prefix_of(path).with_name(prefix_of(path).name + ".index").is_file()
    return not path.exists() and path.with_name(path.name + ".index").is_file()


def prefix_of(path: Path) -> Path:
    """``model.ckpt-9.meta`` -> ``model.ckpt-9`` (a prefix stays as it is)."""
    name = re.sub(r"(\.index|\.meta|\.data-\d+-of-\d+)$", "", path.name)
    return path.with_name(name)


def steps(folder: Path) -> dict[int, Path]:
    """The checkpoints of ``folder`` by global step, from the ``.index`` files there."""
    found = {}
    for index in folder.glob("*.index"):
        step = re.search(r"-(\d+)$", index.name[: -len(".index")])
        if step:
            found[int(step[1])] = index.with_suffix("")
    return found


def resolve(path: Path, step: int | None) -> Path:
    """The checkpoint prefix ``path`` means (``step``: which one of a folder); refused when it has no ``.meta``."""
    path = Path(path)
    if path.is_dir():
        tf = import_tensorflow()
        if step is None:
            try:
                latest = tf.train.latest_checkpoint(str(path))
            except Exception as exc:  # a damaged checkpoint file: TensorFlow's parse error
                raise InputError(f"{path / STATE}: cannot be read ({type(exc).__name__})") from None
            if latest is None:
                raise InputError(f"{path}: its {STATE} file names no checkpoint that exists in the folder")
            prefix = Path(latest)
        else:
            found = steps(path)
            if step not in found:
                have = ", ".join(map(str, sorted(found))) or "none"
                raise InputError(f"{path}: no checkpoint of step {step} (--step); steps here: {have}")
            prefix = found[step]
    else:
        prefix = prefix_of(path)
        if step is not None and not prefix.name.endswith(f"-{step}"):
            raise InputError(f"--step picks a checkpoint of a model folder; {path} names another one already")
    if not prefix.with_name(prefix.name + ".meta").is_file():
        raise InputError(f"{prefix}: no {prefix.name}.meta beside the checkpoint: bnrepair needs the graph the "
                         "training script saved with it (tf.train.Saver writes it unless write_meta_graph=False)")
    return prefix


def meta_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".meta")


def read_meta(prefix: Path):
    """The MetaGraphDef saved beside the checkpoint ``prefix``."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import meta_graph_pb2

    meta = meta_graph_pb2.MetaGraphDef()
    try:
        meta.ParseFromString(meta_path(prefix).read_bytes())
    except (DecodeError, OSError) as exc:
        raise InputError(f"{meta_path(prefix)}: cannot be read as a TensorFlow meta graph ({exc})") from None
    return meta


def files_of(prefix: Path) -> list[Path]:
    """The files that make the checkpoint ``prefix``: its data shards, its index, its meta graph."""
    data = sorted(prefix.parent.glob(f"{glob.escape(prefix.name)}.data-*-of-*"))
    return data + [meta_path(prefix), prefix.with_name(prefix.name + ".index")]


def write_patched(source: Path, dest: Path, values: dict[str, np.ndarray]) -> None:
    """Write the checkpoint ``source`` again as ``dest`` with the entries in ``values`` replaced, its ``.meta``
    copied, and a ``checkpoint`` file naming it where ``dest``'s folder has none (the input's own folder keeps
    the file it has, which is the input's).

    The files are built in a temporary folder beside ``dest``, checked, and renamed into place, the index last:
    a checkpoint without its index does not exist for TensorFlow, and an interrupted run removes what it moved.
    """
    with scratch_folder(dest) as tmp:
        rewrite_checkpoint(source, tmp / dest.name, values)
        shutil.copyfile(meta_path(source), meta_path(tmp / dest.name))
        built = files_of(tmp / dest.name)
        if not (dest.parent / STATE).exists():
            (tmp / STATE).write_text(_state_text(dest.name))
            built.append(tmp / STATE)
        moved = []
        try:
            for path in built:
                os.replace(path, dest.parent / path.name)
                moved.append(dest.parent / path.name)
        except BaseException:
            for path in moved:
                path.unlink(missing_ok=True)
            raise
    if not (dest.parent / (dest.name + ".index")).is_file():
        raise BnrepairError(f"{dest}: the checkpoint was not written")


def _state_text(name: str) -> str:
    """A ``checkpoint`` file naming the checkpoint ``name`` of its folder (relative, so the folder can move)."""
    from google.protobuf import text_format
    from tensorflow.python.training import checkpoint_state_pb2

    state = checkpoint_state_pb2.CheckpointState(model_checkpoint_path=name, all_model_checkpoint_paths=[name])
    return text_format.MessageToString(state)
