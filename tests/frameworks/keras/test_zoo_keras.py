"""The zoo's CI subset for Keras: keras.applications models, statistics broken on purpose, repaired by the CLI
and checked against training-mode BN and the inference fixed point computed independently (``bench/zoo.py``
runs them all)."""

import pytest

from bench import zoo


@pytest.mark.parametrize("name", ["MobileNetV2"])
def test_keras_application_is_recalibrated_exactly(name, tmp_path):
    row = zoo.run_keras(name, tmp_path, samples=48, batch_size=16)
    assert row.found == row.true > 0
    assert row.train_error <= 1e-4 and row.eval_error <= 1e-4, row
    assert row.converged
