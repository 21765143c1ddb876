"""`fold`, `export` and `recalibrate --export` given bad input, as a deployment engineer meets it: one line on
stderr naming the file (or option) and what is wrong, exit 2, nothing written, not even a temporary file."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import bnrepair
from bnrepair.cli import app
from bnrepair.errors import InputError
from bnrepair.frameworks.onnx_runtime import ort_max_opset
from bnrepair.frameworks.tf_runtime import import_keras
from bnrepair.frameworks.torch import fold as torch_fold
from fixtures import ARCH_FLAGS, CALIB, KERAS_STALE, REPO, TORCH_STALE

keras, _ = import_keras()
ROOT = REPO
KERAS, TORCH, ARCH = KERAS_STALE, TORCH_STALE, ARCH_FLAGS
cli = CliRunner()

TWO_INPUTS = '''
import torch


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.example_input_shape = (3, 8, 8)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x, y):
        return self.bn(self.conv(x) + self.conv(y))


def build():
    return TwoInputs()
'''


def refused(tmp_path: Path, args, *words) -> str:
    """Exit 2 with one line holding ``words``, and nothing new under ``tmp_path``."""
    before = set(tmp_path.rglob("*"))
    result = cli.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for word in words:
        assert word in result.output, result.output
    assert set(tmp_path.rglob("*")) == before
    return result.output


@pytest.mark.parametrize("args, words", [
    (["export", KERAS, "-o", "{tmp}/m.onnx", "--samples", "0"], ["--samples"]),
    (["fold", KERAS, "-o", "{tmp}/m.keras", "--opset", "abc"], ["--opset"]),
    (["fold", KERAS, "-o", "{tmp}/m.keras", "--bogus"], ["--bogus"]),
    (["export", KERAS], ["--output"]),
    (["export", KERAS, "-o", "{tmp}/m.onnx", "--json", "{tmp}/no/r.json"], ["--json", "does not exist"]),
])
def test_option_mistakes_are_one_line_errors(tmp_path, args, words):
    """Click's usage text and panel are several lines; a bad option is bad input like any other."""
    refused(tmp_path, [str(a).format(tmp=tmp_path) for a in args], *words)


@pytest.mark.parametrize("command, suffix", [("fold", ".keras"), ("export", ".onnx")])
@pytest.mark.parametrize("option, value", [("--atol", "-1"), ("--rtol", "nan")])
def test_tolerances_must_not_be_negative(tmp_path, command, suffix, option, value):
    """A negative or NaN tolerance used to run everything and then report a verification failure."""
    refused(tmp_path, [command, KERAS, "-o", tmp_path / f"m{suffix}", option, value], "must be >= 0")


@pytest.mark.parametrize("framework", ["keras", "torch"])
def test_opset_stops_at_what_onnxruntime_and_the_exporter_take(tmp_path, framework):
    """onnx knows newer opsets than onnxruntime loads (or torch exports): those were accepted, then failed late,
    torch printing its whole traced graph."""
    source, extra = (KERAS, []) if framework == "keras" else (TORCH, ARCH)
    newest = min(ort_max_opset(), torch_fold.max_opset()) if framework == "torch" else ort_max_opset()
    refused(tmp_path, ["export", source, "-o", tmp_path / "m.onnx", "--opset", newest + 1, *extra],
            f"--opset must be between 13 and {newest}")
    done = cli.invoke(app, ["export", str(source), "-o", str(tmp_path / "m.onnx"), "--opset", str(newest), "-q",
                            *extra])
    assert done.exit_code == 0, done.output


def test_models_that_do_not_take_the_verification_batch_name_the_file(tmp_path):
    """Several inputs, or images resized to a size the model does not take: a traceback and exit 1 before."""
    a, b = keras.Input((8, 8, 3), name="a"), keras.Input((8, 8, 3), name="b")
    conv = keras.layers.Conv2D(4, 3)
    merged = keras.layers.Add()([conv(a), conv(b)])
    keras.Model([a, b], keras.layers.BatchNormalization()(merged)).save(tmp_path / "two.keras")
    (tmp_path / "two_inputs.py").write_text(TWO_INPUTS)
    torch.save(torch.nn.ModuleDict({"conv": torch.nn.Conv2d(3, 4, 3), "bn": torch.nn.BatchNorm2d(4)}).state_dict(),
               tmp_path / "two.pt")
    two_arch = ["--arch", f"{tmp_path / 'two_inputs.py'}:build"]
    wanted = "does not run on one input batch"
    refused(tmp_path, ["export", tmp_path / "two.keras", "-o", tmp_path / "m.onnx"], f"two.keras: the model {wanted}")
    refused(tmp_path, ["fold", tmp_path / "two.keras", "-o", tmp_path / "m.keras"], wanted)
    refused(tmp_path, ["export", tmp_path / "two.pt", *two_arch, "-o", tmp_path / "m.onnx", "--fold"],
            f"two.pt: the model {wanted}", "missing 1 required positional argument")
    refused(tmp_path, ["fold", KERAS, "-o", tmp_path / "m.keras", "--data", CALIB, "--image-size", "16", "16"],
            f"{KERAS}: the model {wanted} of shape (32, 16, 16, 3)")


def test_a_source_that_computes_nan_is_refused_as_such(tmp_path):
    """A negative stored variance made the source itself NaN; that was reported as the fold or the ONNX model
    differing from it by inf, with numpy's RuntimeWarning on stderr."""
    x = keras.Input((6, 6, 2))
    bn = keras.layers.BatchNormalization()
    model = keras.Model(x, keras.layers.GlobalAveragePooling2D()(bn(keras.layers.Conv2D(3, 3)(x))))
    bn.moving_variance.assign(np.array([1.0, -5.0, 1.0], np.float32))
    model.save(tmp_path / "negative_var.keras")
    for command, suffix in (("fold", ".keras"), ("export", ".onnx")):
        refused(tmp_path, [command, tmp_path / "negative_var.keras", "-o", tmp_path / f"m{suffix}"],
                "negative_var.keras: the model's own outputs hold NaN")


def test_lambda_model_folds_with_unsafe_and_exports(tmp_path):
    """--unsafe loaded the model, but the folded copy was rebuilt in safe mode and failed on the Lambda."""
    x = keras.Input((8, 8, 3))
    y = keras.layers.Lambda(lambda t: t * 2.0, name="double")(keras.layers.BatchNormalization()(
        keras.layers.Conv2D(4, 3)(x)))
    model = keras.Model(x, y)
    model.layers[2].moving_mean.assign(np.linspace(-1, 1, 4, dtype=np.float32))
    model.save(tmp_path / "lambda.keras")
    done = cli.invoke(app, ["fold", str(tmp_path / "lambda.keras"), "-o", str(tmp_path / "folded.keras"), "--unsafe",
                            "-q"])
    assert done.exit_code == 0, done.output
    folded = keras.models.load_model(tmp_path / "folded.keras", compile=False, safe_mode=False)
    assert not [layer for layer in folded.layers if isinstance(layer, keras.layers.BatchNormalization)]
    probe = np.random.default_rng(0).random((5, 8, 8, 3), dtype=np.float32)
    assert float(np.max(np.abs(folded.predict(probe, verbose=0) - model.predict(probe, verbose=0)))) <= 1e-5
    done = cli.invoke(app, ["export", str(tmp_path / "lambda.keras"), "-o", str(tmp_path / "m.onnx"), "--unsafe",
                            "-q"])  # the emitter has no Lambda: tf2onnx converts what TensorFlow runs
    assert done.exit_code == 0, done.output
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: probe})[0]
    assert float(np.max(np.abs(got - model.predict(probe, verbose=0)))) <= 1e-5


def test_torchscript_exports_unfolded_and_folding_it_is_refused_naming_the_file(tmp_path):
    """A TorchScript archive goes through torch's TorchScript-based exporter as it is; folding it is refused
    (fx cannot trace a ScriptModule), before anything is written."""
    import onnxruntime as ort

    scripted = ROOT / "fixtures" / "torch" / "homogeneous.pt"
    done = cli.invoke(app, [str(a) for a in ["recalibrate", scripted, "--trust-code", "--data", CALIB, "-o",
                                             tmp_path / "fixed.pt", "--export", tmp_path / "m.onnx", "-q"]])
    assert done.exit_code == 0, done.output
    x = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = torch.jit.load(str(tmp_path / "fixed.pt")).eval()(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], want, atol=1e-4)
    refused(tmp_path, ["export", scripted, "--trust-code", "-o", tmp_path / "f.onnx", "--fold"],
            f"{scripted}: a TorchScript archive is exported as it is (--no-fold) but not folded")
    refused(tmp_path, ["recalibrate", scripted, "--trust-code", "--data", CALIB, "-o", tmp_path / "again.pt",
                       "--export", tmp_path / "f.onnx", "--fold", "--mode", "eval", "--max-passes", "2"],
            f"{scripted}: a TorchScript archive is exported as it is (--no-fold) but not folded")


@pytest.mark.parametrize("name", ["keras3_export", "tf1_slim"])
def test_a_recalibrated_savedmodel_exports_through_tf2onnx_and_matches_its_own_signature(tmp_path, name):
    """The ONNX holds the new statistics: it computes what the repaired SavedModel's own serving signature does
    (TensorFlow loading it independently); folding a graph is refused, naming the file."""
    import onnxruntime as ort
    import tensorflow as tf

    saved = ROOT / "fixtures" / "savedmodel" / name
    done = cli.invoke(app, [str(a) for a in ["recalibrate", saved, "--data", CALIB, "-o", tmp_path / "fixed",
                                             "--export", tmp_path / "m.onnx", "-q"]])
    assert done.exit_code == 0, done.output
    signature = tf.saved_model.load(str(tmp_path / "fixed")).signatures["serving_default"]
    x = np.random.default_rng(0).random((6, 32, 32, 3), dtype=np.float32)
    # tf1_slim's second input (a softmax temperature) feeds only "probabilities", which the export leaves out:
    # the calibration input alone does not determine it
    feeds = {k: tf.constant(x) if v.shape.rank == 4 else tf.ones([], v.dtype)
             for k, v in signature.structured_input_signature[1].items()}
    first = sorted(signature.structured_outputs)[0]
    want = signature(**feeds)[first].numpy()
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})
    stale = tf.saved_model.load(str(saved)).signatures["serving_default"](**feeds)[first].numpy()
    assert not np.allclose(stale, want, atol=1e-3)  # the recalibration changed what the model computes
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=1e-4)
    refused(tmp_path, ["export", saved, "-o", tmp_path / "f.onnx", "--fold"],
            f"{saved}: a SavedModel is a graph, without layers whose weights could take a BN in")


def test_outputs_that_would_clobber_something_are_refused(tmp_path):
    """--export onto -o silently replaced the repaired checkpoint (now refused already because the repaired
    checkpoint keeps the input's suffix); a folder as output failed after all the work."""
    refused(tmp_path, ["recalibrate", KERAS, "--data", CALIB, "-o", tmp_path / "fixed.onnx", "--export",
                       tmp_path / "fixed.onnx"], "name it *.h5")
    (tmp_path / "model.keras").mkdir()
    refused(tmp_path, ["fold", KERAS, "-o", tmp_path / "model.keras"], "is a folder")
    (tmp_path / "model.onnx").mkdir()
    refused(tmp_path, ["export", TORCH, *ARCH, "-o", tmp_path / "model.onnx"], "is a folder")


def test_quiet_h5_fold_prints_nothing(tmp_path, caplog):
    """Keras warns on every .h5 save that the format is legacy; the user asked for .h5, and -q means errors only."""
    with caplog.at_level(logging.WARNING):
        done = cli.invoke(app, ["fold", str(KERAS), "-o", str(tmp_path / "folded.h5"), "-q"])
    assert done.exit_code == 0, done.output
    assert done.output == "" and not [r for r in caplog.records if "HDF5" in r.getMessage()]


def test_failing_torch_export_prints_only_its_error(tmp_path, capfd):
    """torch.onnx.export turns its C++ log on by itself and dumps the traced graph on file descriptor 1."""
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False),
                                 torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2)).eval()
    x = np.random.default_rng(0).random((8, 3, 6, 6), dtype=np.float32)
    with pytest.raises(InputError, match="torch.onnx.export failed"):
        bnrepair.export(module, tmp_path / "m.onnx", data=x)
    assert "graph(" not in "".join(capfd.readouterr())
    assert not list(tmp_path.iterdir())


def test_a_path_with_brackets_is_printed_as_given(tmp_path):
    """Messages were printed as rich markup, which ate ``[...]`` out of file names."""
    refused(tmp_path, ["export", tmp_path / "model[1].h5", "-o", tmp_path / "m.onnx"], "model[1].h5: no such file")
