"""PyTorch wing tests: skipped as a whole where torch is not installed."""

import pytest

pytest.importorskip("torch", reason="the PyTorch tests need torch: pip install '.[torch]'")
