"""onnxruntime shared by the ONNX wing and every export's verification: the import, the providers, sessions.

As ``tf_runtime.py`` is for TensorFlow: imported only where ONNX is used, so ``bnrepair --help`` and a run
without ONNX never import onnxruntime.
"""

from __future__ import annotations

import functools

from ..errors import BnrepairError, VerificationError, first_line, require

OPSET_PROBED = 17
"""the opset of the model that probes whether CUDA starts"""
OPSET_MIN = 13
"""the lowest opset an export may ask for: the Softmax, Clip and Pad semantics the Keras emitter writes"""


def require_onnx() -> None:
    require(("onnx", "onnxruntime"), "ONNX export", "onnx")


def import_ort():
    """onnxruntime, or one line saying how to mend an install left half-removed (a CPU and a GPU build installed
    side by side, then one uninstalled, leave a package without its API)."""
    require_onnx()
    import onnxruntime as ort

    if not all(hasattr(ort, name) for name in ("InferenceSession", "get_available_providers")):
        raise BnrepairError("onnxruntime is installed but broken (it has no InferenceSession; two builds installed "
                            "over each other?): pip uninstall -y onnxruntime onnxruntime-gpu, then from the bnrepair "
                            "checkout pip install '.[onnx]' (or '.[gpu]' for CUDA)")
    return ort


@functools.cache
def cuda_usable() -> bool:
    """Whether onnxruntime's CUDA provider really starts here; probed once with ORT's logging silenced,
    since a GPU build on a machine without a GPU (or without CUDA libraries) logs its fallback."""
    ort = import_ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(_probe(OPSET_PROBED).SerializeToString(), options,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return session.get_providers()[0] == "CUDAExecutionProvider"
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(2)


def _probe(opset: int):
    """The smallest model of ``opset`` (an Identity), at the lowest IR version that opset needs."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    probe.ir_version = helper.find_min_ir_version_for(probe.opset_import)
    return probe


@functools.cache
def ort_max_opset() -> int:
    """The newest opset onnxruntime loads, probed (it publishes no such number); onnx may know newer ones."""
    import onnx

    ort = import_ort()
    for opset in range(onnx.defs.onnx_opset_version(), OPSET_MIN, -1):
        try:
            ort.InferenceSession(_probe(opset).SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:
            continue
    return OPSET_MIN


def onnx_session(model: bytes):
    """An onnxruntime session on CUDA when it is usable, else on the CPU."""
    ort = import_ort()
    providers = ["CPUExecutionProvider"]
    if cuda_usable():  # full float32, as the source is run: no TF32 in convs and matmuls
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's notes on a graph are not the user's to act on
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:
        raise VerificationError(f"onnxruntime cannot load the exported model: {first_line(exc)}") from None
