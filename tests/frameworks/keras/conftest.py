"""Keras wing tests: skipped as a whole where TensorFlow / Keras are not installed."""

import pytest

pytest.importorskip("tensorflow", reason="the Keras tests need TensorFlow: pip install '.[keras]'")
pytest.importorskip("keras", reason="the Keras tests need Keras 3: pip install '.[keras]'")
