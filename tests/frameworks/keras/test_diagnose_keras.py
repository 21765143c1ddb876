"""inspect and diagnose on the real Keras fixtures: right causes, exit codes, predicted gain, plot."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import bnrepair
from bnrepair.cli import app
from bnrepair.frameworks.tf_runtime import import_keras
from bnrepair.plot import plot_evidence
from fixtures import synthetic

keras, tf = import_keras()
cli = CliRunner()
FIXTURES = synthetic.ROOT.parent / "keras"
# fixture, data domain, expected cause
BROKEN = [("stale_ema.h5", "a", "stale"), ("never_updated.keras", "a", "never_updated"),
          ("frozen_bn.h5", "b", "domain_shift"), ("homogeneous.keras", "a", "domain_shift"),
          ("homogeneous.keras", "b", "domain_shift")]


def diagnose(tmp_path, name, domain, *extra):
    report = tmp_path / f"{name}-{domain}.json"
    result = cli.invoke(app, ["diagnose", str(FIXTURES / name), "--data", str(synthetic.folder(domain, "heldout")),
                              "--json", str(report), *extra])
    return result, json.loads(report.read_text()) if report.exists() else None


@pytest.mark.parametrize("name,domain,cause", BROKEN, ids=[f"{n}-{d}" for n, d, _ in BROKEN])
def test_each_broken_fixture_gets_its_cause_and_exit_1(tmp_path, name, domain, cause):
    result, report = diagnose(tmp_path, name, domain)
    assert result.exit_code == 1, result.output
    assert report["verdicts"][0]["cause"] == cause, report["verdicts"]
    assert report["verdicts"][0]["evidence"] and "bnrepair recalibrate" in report["verdicts"][0]["fix"]
    worst = report["layers"][0]
    assert worst["problem"] and worst["share_off"] > 0.1
    acc = report["outputs"]["accuracy"]
    assert acc["recalibrated"] >= acc["training"] - 0.02 and acc["recalibrated"] > acc["inference"] + 0.05
    assert report["outputs"]["expected_gain"] == pytest.approx(acc["recalibrated"] - acc["inference"])
    assert report["outputs"]["agreement_inference_vs_training"] < 0.95
    if name == "frozen_bn.h5":
        assert any(layer["frozen"] and layer["problem"] for layer in report["layers"])


def test_healthy_model_passes_the_gate(tmp_path):
    result, report = diagnose(tmp_path, "healthy.keras", "a")
    assert result.exit_code == 0, result.output
    assert report["healthy"] and report["verdicts"][0]["cause"] == "healthy"
    assert not any(layer["problem"] for layer in report["layers"])
    assert abs(report["outputs"]["expected_gain"]) <= 0.02
    inspected = cli.invoke(app, ["inspect", str(FIXTURES / "healthy.keras")])
    assert inspected.exit_code == 0, inspected.output


def test_predicted_gain_matches_the_real_recalibration(tmp_path):
    data = synthetic.folder("a", "heldout")
    _, report = diagnose(tmp_path, "stale_ema.h5", "a")
    out = tmp_path / "fixed.h5"
    assert cli.invoke(app, ["recalibrate", str(FIXTURES / "stale_ema.h5"), "-d", str(data), "-o", str(out),
                            "-q"]).exit_code == 0
    x, y = synthetic.load_split("a", "heldout")
    x = x.astype(np.float32) / 255.0
    before = keras.models.load_model(FIXTURES / "stale_ema.h5", compile=False).predict(x, verbose=0)
    after = keras.models.load_model(out, compile=False).predict(x, verbose=0)
    real_gain = np.mean(after.argmax(1) == y) - np.mean(before.argmax(1) == y)
    assert abs(report["outputs"]["expected_gain"] - real_gain) <= 0.01
    assert abs(report["outputs"]["accuracy"]["inference"] - np.mean(before.argmax(1) == y)) <= 1e-9


def test_plot_has_one_bar_per_layer_and_shows_the_difference(tmp_path):
    data = synthetic.folder("a", "heldout")
    pictures = {}
    for name in ("healthy.keras", "never_updated.keras"):
        report = bnrepair.diagnose(str(FIXTURES / name), str(data), samples=128)
        path = tmp_path / f"{name}.png"
        assert plot_evidence(report, path) == len(report.layers) == len(bnrepair.load(FIXTURES / name).graph.bn_layers)
        with Image.open(path) as img:
            assert img.format == "PNG"
            pictures[name] = np.asarray(img.convert("RGB"), np.int16)
    healthy, broken = pictures.values()
    assert healthy.shape == broken.shape
    assert np.mean(np.any(healthy != broken, axis=-1)) > 0.01
    red = lambda img: np.sum((img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] < 80))  # noqa: E731
    assert red(broken) > 100 * max(red(healthy), 1)


def test_inspect_flags_initial_statistics_and_slow_momentum(tmp_path):
    result = cli.invoke(app, ["inspect", str(FIXTURES / "never_updated.keras"), "--json", str(tmp_path / "i.json")])
    assert result.exit_code == 1, result.output
    flags = json.loads((tmp_path / "i.json").read_text())["flags"]
    assert {f["code"] for f in flags} >= {"never_updated"}
    result = cli.invoke(app, ["inspect", str(FIXTURES / "stale_ema.h5"), "--json", str(tmp_path / "s.json")])
    codes = {f["code"] for f in json.loads((tmp_path / "s.json").read_text())["flags"]}
    assert "slow_momentum" in codes and result.exit_code == 1


def test_inspect_runs_no_computation_on_data():
    """Only symbolic tensors reach BatchNormalization.call while inspecting; eager data would be seen."""
    eager_calls = []
    original = keras.layers.BatchNormalization.call

    def watching(self, inputs, *args, **kwargs):
        if not tf.is_symbolic_tensor(inputs) and not isinstance(inputs, keras.KerasTensor):
            eager_calls.append(self.name)
        return original(self, inputs, *args, **kwargs)

    keras.layers.BatchNormalization.call = watching
    try:
        report = bnrepair.inspect(FIXTURES / "stale_ema.h5")
        assert report.layers and eager_calls == []
        model = keras.models.load_model(FIXTURES / "stale_ema.h5", compile=False)
        model(np.zeros((1, *model.inputs[0].shape[1:]), np.float32))
        assert eager_calls  # the watcher does see real computation
    finally:
        keras.layers.BatchNormalization.call = original


def test_reused_bn_layer_is_flagged():
    inp_a, inp_b = keras.Input((3,)), keras.Input((3,))
    bn = keras.layers.BatchNormalization(name="shared_bn")
    model = keras.Model([inp_a, inp_b], keras.layers.Add()([bn(inp_a), bn(inp_b)]))
    report = bnrepair.inspect(model)
    assert any(f.code == "reused" and f.layer == "shared_bn" for f in report.flags)


def test_diagnose_bad_input_exits_2(tmp_path):
    result = cli.invoke(app, ["diagnose", str(FIXTURES / "stale_ema.h5"), "--data", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_too_few_samples_get_no_verdict(tmp_path):
    """4 samples called a healthy model domain-shifted (exit 1): chance alone moves their statistics that far."""
    data = synthetic.folder("a", "calib")
    result = cli.invoke(app, ["diagnose", str(FIXTURES / "healthy.keras"), "--data", str(data), "--samples", "4"])
    assert result.exit_code == 2 and "4 samples are too few for a verdict" in result.output, result.output


def test_inspect_reports_non_finite_statistics_in_an_h5_file(tmp_path):
    """NaN never equals itself: the check that the file holds what Keras loaded refused the file instead."""
    import shutil

    import h5py

    broken = tmp_path / "nan.h5"
    shutil.copy(FIXTURES / "stale_ema.h5", broken)
    with h5py.File(broken, "r+") as f:
        dataset = f["model_weights/bn1/bn1/moving_variance"]
        values = dataset[()]
        values[0] = np.nan
        dataset[...] = values
    result = cli.invoke(app, ["inspect", str(broken), "--json", str(tmp_path / "i.json")])
    assert result.exit_code == 1, result.output
    flags = json.loads((tmp_path / "i.json").read_text())["flags"]
    assert any(f["layer"] == "bn1" and "NaN" in f["message"] for f in flags), flags


def test_the_fix_line_repeats_every_data_and_load_option_of_the_run(tmp_path):
    """The command diagnose recommends is the run again: the same preprocessing, size, bad-image policy and input
    element, so the recalibration it starts sees the inputs the diagnosis saw; running it repairs the model."""
    import shlex

    extra = ["--image-size", "32", "32", "--input-index", "1", "--skip-bad", "--preprocess", "tf", "--seed", "3"]
    result, report = diagnose(tmp_path, "stale_ema.h5", "a", *extra)
    assert result.exit_code == 1, result.output
    words = shlex.split(report["verdicts"][0]["fix"])
    assert words[:3] == ["bnrepair", "recalibrate", str(FIXTURES / "stale_ema.h5")]
    given = " ".join(words)
    for flag in ("--image-size 32 32", "--input-index 1", "--skip-bad", "--preprocess tf", "--seed 3",
                 f"--data {synthetic.folder('a', 'heldout')}"):
        assert flag in given, (flag, given)
    assert "--samples" not in given  # diagnose's own read cap is not the recalibration's
    fixed = tmp_path / "fixed.h5"
    done = cli.invoke(app, [*words[1:], "-o", str(fixed), "-q"])
    assert done.exit_code == 0, done.output
    assert bnrepair.diagnose(fixed, synthetic.folder("a", "heldout"), preprocess="tf").healthy
