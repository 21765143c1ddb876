"""The shipped Keras fixtures are really broken, and recalibration really repairs them.

Real files, real Keras, judged on held-out images the models never saw: inference-mode accuracy
before (bad), with BN on batch statistics ("training mode", what the model scored while it
trained), and after ``bnrepair recalibrate`` (within 2 points of training mode). Homogeneous
batches are repaired per domain, with that domain's calibration images.
"""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import bnrepair
from bnrepair.cli import app
from bnrepair.frameworks.tf_runtime import import_keras

keras, tf = import_keras()

from fixtures import make_keras, synthetic

FILES = make_keras.OUT
# (fixture, domain its calibration and held-out images come from)
CASES = [("stale_ema.h5", "a"), ("never_updated.keras", "a"), ("frozen_bn.h5", "b"),
         ("homogeneous.keras", "a"), ("homogeneous.keras", "b")]
IDS = [f"{name}-{domain}" for name, domain in CASES]
cli = CliRunner()


def load(path):
    return keras.models.load_model(path, compile=False)


def calib(domain: str):
    return synthetic.folder(domain, "calib")


def bn_layers(model):
    return make_keras.bn_layers(model)


@pytest.fixture(scope="module")
def heldout():
    return {domain: make_keras.heldout(domain) for domain in synthetic.DOMAINS}


@pytest.fixture(scope="module")
def originals():
    return {name: load(FILES / name) for name in dict(CASES)}


@pytest.fixture(scope="module")
def baseline(originals, heldout):
    """(inference-mode accuracy, training-mode accuracy) of each fixture as shipped."""
    return {(name, domain): (make_keras.accuracy(originals[name], *heldout[domain]),
                             make_keras.batch_stats_accuracy(originals[name], *heldout[domain]))
            for name, domain in CASES}


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """Each case recalibrated once through the CLI: (output path, loaded output, JSON report)."""
    out = tmp_path_factory.mktemp("repaired")
    results = {}
    for name, domain in CASES:
        target, report = out / f"{domain}_{name}", out / f"{domain}_{name}.json"
        result = cli.invoke(app, ["recalibrate", str(FILES / name), "--data", str(calib(domain)),
                                  "-o", str(target), "--json", str(report), "--quiet"])
        assert result.exit_code == 0, result.output
        results[(name, domain)] = (target, load(target), json.loads(report.read_text()))
    return results


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fixture_scores_well_only_with_batch_statistics(case, baseline):
    before, training = baseline[case]
    assert training > 0.85
    # homogeneous batches leave a mixture that hurts domain b most; every other cause breaks outright
    assert before < (training - 0.1 if case[0] == "homogeneous.keras" else 0.5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_recalibrated_file_predicts_like_training_mode(case, baseline, repaired, heldout):
    _, training = baseline[case]
    _, model, report = repaired[case]
    after = make_keras.accuracy(model, *heldout[case[1]])
    assert abs(after - training) <= 0.02, (after, training)
    assert report["samples"] == len(synthetic.load_split(case[1], "calib")[1])


def test_never_updated_statistics_are_still_the_initial_ones(originals, repaired):
    for layer in bn_layers(originals["never_updated.keras"]):
        assert np.all(layer.moving_mean.numpy() == 0) and np.all(layer.moving_variance.numpy() == 1)
    _, model, _ = repaired[("never_updated.keras", "a")]
    for layer in bn_layers(model):
        assert np.abs(layer.moving_mean.numpy()).max() > 0.01


def test_stale_ema_was_far_from_the_data(repaired):
    """Momentum 0.999 for a short run: the stored averages sat several new stds from the truth."""
    _, _, report = repaired[("stale_ema.h5", "a")]
    assert max(layer["max_mean_shift"] for layer in report["layers"]) > 1


def test_frozen_layers_are_reported_and_stay_frozen(originals, repaired):
    frozen = {layer.name for layer in bn_layers(originals["frozen_bn.h5"]) if not layer.trainable}
    assert frozen == {"bn1", "bn2", "bn3"}
    _, model, report = repaired[("frozen_bn.h5", "b")]
    assert {layer["id"] for layer in report["layers"] if layer["frozen"]} == frozen
    assert {layer.name for layer in bn_layers(model) if not layer.trainable} == frozen


def test_homogeneous_batches_need_per_domain_statistics(tmp_path, repaired, heldout):
    """One set of statistics from both domains does not repair domain b; b's own images do."""
    both = np.concatenate([synthetic.load_split(d, "calib")[0] for d in synthetic.DOMAINS]).astype(np.float32) / 255
    target = tmp_path / "both.keras"
    bnrepair.recalibrate(FILES / "homogeneous.keras", both, output=target)
    pooled = make_keras.accuracy(load(target), *heldout["b"])
    per_domain = make_keras.accuracy(repaired[("homogeneous.keras", "b")][1], *heldout["b"])
    assert pooled < per_domain - 0.1, (pooled, per_domain)
    on_a = make_keras.accuracy(repaired[("homogeneous.keras", "a")][1], *heldout["b"])
    assert on_a < per_domain - 0.1, (on_a, per_domain)


def test_in_memory_model_is_repaired_in_place(baseline, heldout):
    model = load(FILES / "stale_ema.h5")
    report = bnrepair.recalibrate(model, calib("a"))
    _, training = baseline[("stale_ema.h5", "a")]
    assert abs(make_keras.accuracy(model, *heldout["a"]) - training) <= 0.02
    assert report.output is None and len(report.layers) == 3


def test_command_line_end_to_end(tmp_path, repaired):
    """The installed command, in its own process: default output name, input untouched, and the
    same bytes as the in-process run with the same seed."""
    source = tmp_path / "stale_ema.h5"
    shutil.copyfile(FILES / "stale_ema.h5", source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    done = subprocess.run([sys.executable, "-m", "bnrepair.cli", "recalibrate", str(source), "--data",
                           str(calib("a")), "--quiet"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    output = tmp_path / "stale_ema.recalibrated.h5"
    assert output.read_bytes() == repaired[("stale_ema.h5", "a")][0].read_bytes()
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
