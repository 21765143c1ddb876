"""The zoo's CI subset for Keras: keras.applications models, statistics broken on purpose, repaired by the CLI
and checked against training-mode BN and the inference fixed point computed independently in float64; one
model folded and exported (``bench/zoo.py`` and ``bench/zoo_deploy.py`` run them all)."""

import pytest

from bench import zoo, zoo_deploy


@pytest.mark.parametrize("name, passes", [("MobileNetV2", zoo.PASSES), ("MobileNetV2_savedmodel", zoo.PASSES),
                                          ("masked_sequence", 4)])
def test_keras_application_is_recalibrated_exactly(name, passes, tmp_path):
    row = zoo.run_keras(name, tmp_path, samples=48, batch_size=16)
    assert row.found == row.true > 0
    assert row.train_error <= 1e-4 and row.eval_error <= 1e-4, row
    assert row.converged and row.passes <= passes, row  # 52 BN deep: plain passes take 49


def test_mobilenet_v3_folds_and_exports_with_its_operations(tmp_path):
    """MobileNetV3's hard-swish is built from Keras operations (x + 3.0), not layers: fold and export once
    crashed on them, and its Rescaling had no ONNX counterpart."""
    pytest.importorskip("onnxruntime")
    row = zoo_deploy.run("MobileNetV3Small", "keras", tmp_path, samples=8)
    assert not row["notes"], row["notes"]
    assert row["folded"] == row["bn"] == 34 and row["bn nodes left"] == 0
