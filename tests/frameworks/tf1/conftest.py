"""TF1 checkpoint wing tests: skipped as a whole where TensorFlow (or onnxruntime, for the export) is not
installed."""

import pytest

pytest.importorskip("tensorflow", reason="the TF1 checkpoint tests need TensorFlow: pip install '.[keras]'")
pytest.importorskip("onnxruntime", reason="the TF1 checkpoint tests export ONNX: pip install '.[onnx]'")
