"""The layer graph a Keras model declares in its own serialized config: calls, and the tensors they read.

Shared by folding and the ONNX emitter. The config lists exactly the calls inside this model (Functional
and Sequential containers, nested ones included), whereas live layers may also remember calls from other
models built on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InputError
from ..tf_runtime import import_keras


@dataclass
class Call:
    """One call of a layer inside a container, with references to the tensors it reads."""

    name: str
    entry: dict
    layer: object
    inputs: list[tuple]
    shapes: list[tuple]

    @property
    def cls(self) -> str:
        return self.entry["class_name"]


@dataclass
class Container:
    """One Functional or Sequential model's calls in order, and which tensors are its inputs / outputs."""

    calls: list[Call]
    inputs: list[tuple]
    outputs: list[tuple]


def serialized(model) -> dict:
    keras, _ = import_keras()
    data = keras.saving.serialize_keras_object(model)
    if "layers" not in data.get("config", {}):
        raise InputError(f"{type(model).__name__} is a subclassed Keras model: folding and ONNX export need a "
                         "Functional or Sequential model (the layer graph is not declared)")
    data.pop("compile_config", None)
    return data


def is_container(entry: dict) -> bool:
    return "layers" in entry.get("config", {})


def container(model, config: dict, prefix: str = "") -> Container:
    """The calls of one container level; references are ``(qualified layer name, node, tensor)``."""
    entries = config["layers"]
    if "input_layers" not in config:  # Sequential: a chain
        calls, previous = [], None
        for entry in entries:
            name = prefix + entry["config"]["name"]
            if entry["class_name"] == "InputLayer":
                previous = (name, 0, 0)
                continue
            shape = tuple(entry.get("build_config", {}).get("input_shape") or ())
            inputs = [previous] if previous else [(prefix + "<input>", 0, 0)]
            calls.append(Call(name, entry, operation(model, entry["config"]["name"]), inputs, [shape]))
            previous = (name, 0, 0)
        first = calls[0].inputs[0] if calls else (prefix + "<input>", 0, 0)
        return Container(calls, [first], [previous])
    calls = []
    for entry in entries:
        name = prefix + entry["config"]["name"]
        layer = None if entry["class_name"] == "InputLayer" else operation(model, entry["config"]["name"])
        for node in entry.get("inbound_nodes", []):
            read = tensors(node)
            calls.append(Call(name, entry, layer, [_qualified(prefix, t["keras_history"]) for t in read],
                              [tuple(t.get("shape") or ()) for t in read]))
    return Container(calls, [_qualified(prefix, r) for r in _layer_refs(config["input_layers"])],
                     [_qualified(prefix, r) for r in _layer_refs(config["output_layers"])])


def operation(model, name: str):
    """The layer, or the Keras 3 operation (``x + 3.0`` in MobileNetV3's hard-swish is one, not a layer), that a
    config entry names."""
    found = next((op for op in getattr(model, "operations", ()) if op.name == name), None)
    return found if found is not None else model.get_layer(name)


def tensors(fragment) -> list[dict]:
    """The Keras tensors a config fragment refers to, in order."""
    if isinstance(fragment, dict):
        if "keras_history" in fragment:
            return [fragment]
        return [t for v in fragment.values() for t in tensors(v)]
    if isinstance(fragment, (list, tuple)):
        return [t for v in fragment for t in tensors(v)]
    return []


def _layer_refs(refs) -> list[tuple]:
    refs = list(refs)
    return [tuple(refs)] if refs and isinstance(refs[0], str) else [tuple(r) for r in refs]


def _qualified(prefix: str, ref) -> tuple:
    return (prefix + ref[0], int(ref[1]), int(ref[2]))
