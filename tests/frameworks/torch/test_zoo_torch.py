"""The zoo's subset for torch: torchvision and timm models with random weights, statistics broken on purpose,
repaired by the CLI and checked against torch's own training-mode BN and the inference fixed point computed
independently (``bench/zoo.py`` runs them all).

Run in a process of its own: a CUDA build of torch brings triton, whose native library crashes a process that
has TensorFlow loaded (the Keras tests load it). Skipped where torchvision / timm are not installed."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from bench.zoo import PASSES
from fixtures import REPO

MISSING = [] if os.environ.get("BNREPAIR_ALL_EXTRAS") else [  # CI: a missing library fails, never skips
    m for m in ("torchvision", "timm") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"the torch zoo needs {' and '.join(MISSING)} "
                                "(pip install torch==2.14.1 torchvision==0.29.1 timm)")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "resnet18_frozen_bn", "timm_efficientnet_b0"])
def test_real_architecture_is_recalibrated_exactly(name):
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; from bench import zoo; import tempfile, pathlib\n"
            "with tempfile.TemporaryDirectory() as tmp:\n"
            "    row = zoo.run_torch(sys.argv[2], pathlib.Path(tmp), 48, 16)\n"
            "print(row.found, row.true, row.train_error, row.eval_error, row.converged, row.passes, row.note)")
    done = subprocess.run([sys.executable, "-c", code, str(REPO), name], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    found, true, train, evaluated, converged, passes = done.stdout.split()[:6]
    assert int(found) == int(true) > 0
    assert float(train) <= 1e-4 and float(evaluated) <= 1e-4, done.stdout
    assert converged == "True" and int(passes) <= PASSES, done.stdout


@pytest.mark.parametrize("name", ["resnet18", "timm_efficientnet_b0"])
def test_real_architecture_folds_every_bn_and_exports(name):
    """bench/zoo_deploy's fold stage on two zoo models (random weights and statistics of a trained net's size):
    ``fold``, ``export --fold`` and ``export --no-fold`` each verified by bnrepair, every BN folded, none left in
    the folded ONNX (efficientnet_b0's 49 folds once exceeded a fixed rtol through accumulated rounding)."""
    code = ("import sys, json, math; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/bench']; import zoo_deploy, "
            "tempfile, pathlib\n"
            "with tempfile.TemporaryDirectory() as tmp:\n"
            "    row = zoo_deploy.run(sys.argv[2], 'torch', pathlib.Path(tmp), 16)\n"
            "print(json.dumps({k: row.get(k) for k in ('bn', 'folded', 'bn nodes left', 'notes')}))\n"
            "print(all(row.get(c) for c in ('fold', 'export --fold', 'export --no-fold')))")
    done = subprocess.run([sys.executable, "-c", code, str(REPO), name], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    summary, every = done.stdout.strip().splitlines()[-2:]
    row = json.loads(summary)
    assert every == "True", row["notes"]
    assert row["folded"] == row["bn"] > 0 and row["bn nodes left"] == 0, row
