"""A SavedModel's serving meta graph and the signature bnrepair feeds: which one, which input, what shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import InputError


@dataclass
class Signature:
    name: str
    inputs: dict[str, str]
    """signature input name -> tensor name"""
    dtypes: dict[str, int]
    """signature input name -> DataType enum"""
    outputs: dict[str, str]
    input_name: str | None
    """the input the calibration data feeds; None until the BN layers say which (several inputs, no --input)"""
    shape: tuple[int | None, ...] | None
    """the shape of that input, batch dimension included"""

    @property
    def input_tensor(self) -> str:
        return self.inputs[self.input_name]


def read_meta_graph(path: Path):
    """The serving MetaGraphDef of the SavedModel at ``path``."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    model = saved_model_pb2.SavedModel()
    try:
        model.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    except (DecodeError, OSError) as exc:
        raise InputError(f"{path}: saved_model.pb cannot be read ({exc})") from None
    graphs = list(model.meta_graphs)
    for wanted in (lambda tags: tags == {"serve"}, lambda tags: "serve" in tags, lambda tags: len(graphs) == 1):
        for meta in graphs:
            if wanted(set(meta.meta_info_def.tags)):
                return meta
    found = "; ".join(",".join(m.meta_info_def.tags) for m in graphs) or "none"
    raise InputError(f"{path}: no meta graph tagged 'serve' (tag sets found: {found})")


def choose_signature(meta, name: str, input_name: str | None, origin: str) -> Signature:
    user = {k: v for k, v in meta.signature_def.items() if not k.startswith("__")}
    if name not in user:
        raise InputError(f"{origin}: no signature {name!r}; the SavedModel has: {', '.join(sorted(user)) or 'none'} "
                         "(choose with --signature)")
    sig = meta.signature_def[name]
    inputs = {k: v.name for k, v in sig.inputs.items()}
    if input_name is None and len(inputs) == 1:
        input_name = next(iter(inputs))
    if input_name is None:
        return Signature(name, inputs, {k: v.dtype for k, v in sig.inputs.items()},
                         {k: v.name for k, v in sig.outputs.items()}, None, None)
    if input_name not in inputs:
        raise InputError(f"{origin}: signature {name!r} has no input {input_name!r}; "
                         f"its inputs: {', '.join(sorted(inputs))}")
    info = sig.inputs[input_name]
    shape = None
    if not info.tensor_shape.unknown_rank:
        shape = tuple(None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
    return Signature(name, inputs, {k: v.dtype for k, v in sig.inputs.items()},
                     {k: v.name for k, v in sig.outputs.items()}, input_name, shape)
