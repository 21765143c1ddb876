"""SavedModel wing tests: skipped as a whole where TensorFlow is not installed."""

import pytest

pytest.importorskip("tensorflow", reason="the SavedModel tests need TensorFlow: pip install '.[keras]'")
