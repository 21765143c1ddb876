"""ONNX wing tests: skipped as a whole where onnx, onnxruntime or torch (which writes the test models) is not
installed."""

import pytest

for module in ("onnx", "onnxruntime", "torch"):
    pytest.importorskip(module, reason=f"the ONNX tests need {module}: pip install '.[onnx,torch]'")
