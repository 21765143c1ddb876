"""End-to-end CLI tests on the shipped fixtures of every format: skipped as a whole unless every framework
is installed (pip install '.[test]')."""

import pytest

for module in ("tensorflow", "keras", "torch", "onnx", "onnxruntime"):
    pytest.importorskip(module, reason=f"the CLI tests run fixtures of every format and need {module}: "
                        "pip install '.[test]'")
