"""Reading an ONNX model safely and writing it back with only BN statistics changed.

External data (models over 2 GB, or saved with it) is read from beside the model only: a location that is
absolute or leaves the model's folder is refused before any byte is read. The output is the input's
ModelProto with the statistics initializers' values replaced in their stored dtype; every other node,
initializer, input, output, opset import and metadata entry is the same message, written the same way
(external data beside the output where the input had it).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

import numpy as np

from ...errors import InputError, first_line
from ...writers import atomic_path, scratch_folder, storable
from .graph import copied, set_initializers


def _external(tensor) -> str | None:
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


def read(path: Path):
    """The ModelProto at ``path``, external data included, after its locations are checked."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    folder = path.resolve().parent
    external = [(t.name, loc) for t in model.graph.initializer if (loc := _external(t)) is not None]
    for name, location in external:
        where = PurePath(location)
        if where.is_absolute() or ".." in where.parts or folder not in (folder / where).resolve().parents:
            raise InputError(f"{path}: initializer {name} keeps its data at {location!r}, outside the model's "
                             "folder; refusing to read it")
    if external:
        try:
            onnx.load_external_data_for_model(model, str(folder))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read its external data ({first_line(exc)})") from None
    try:  # with external data by path (the checker reads it itself; over 2 GB only that way), else as read
        onnx.checker.check_model(str(path) if external else model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise InputError(f"{path}: fails onnx.checker ({first_line(exc)})") from None
    return model, bool(external)


def write(model, source: Path, output: Path, values: dict[str, np.ndarray], external: bool) -> None:
    """``model`` with the initializers in ``values`` replaced (stored dtype kept), written atomically."""
    import onnx
    from onnx import numpy_helper

    out = copied(model)
    stored = {init.name: numpy_helper.to_array(init) for init in out.graph.initializer if init.name in values}
    set_initializers(out, {name: storable(values[name], old.dtype, f"{source}: {name}").reshape(old.shape)
                           for name, old in stored.items()})
    if external:  # the data beside the output, named after it: each file built aside, then renamed into place
        data = output.with_name(output.name + ".data")
        with scratch_folder(output) as folder:
            onnx.save_model(out, str(folder / output.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
            os.replace(folder / data.name, data)
            os.replace(folder / output.name, output)
        return
    with atomic_path(output) as tmp:
        tmp.write_bytes(out.SerializeToString())
