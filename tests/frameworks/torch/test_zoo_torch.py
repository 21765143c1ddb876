"""The zoo's CI subset for torch: torchvision and timm models with random weights, statistics broken on purpose,
repaired by the CLI and checked against torch's own training-mode BN and the inference fixed point computed
independently (``bench/zoo.py`` runs them all). Skipped where torchvision / timm are not installed."""

import pytest

pytest.importorskip("torchvision", reason="the torch zoo needs torchvision (pip install torch==2.14.1 "
                    "torchvision==0.29.1)")
pytest.importorskip("timm", reason="the torch zoo needs timm (pip install timm)")

from bench import zoo  # noqa: E402


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "resnet18_frozen_bn", "timm_resnet18"])
def test_real_architecture_is_recalibrated_exactly(name, tmp_path):
    row = zoo.run_torch(name, tmp_path, samples=48, batch_size=16)
    assert row.found == row.true > 0
    assert row.train_error <= 1e-4 and row.eval_error <= 1e-4, row
    assert row.converged
