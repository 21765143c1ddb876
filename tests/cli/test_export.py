"""`bnrepair export`, `fold` and `recalibrate --export` on the fixtures: valid, traceable ONNX that onnxruntime
runs like the source; failures exit 2 with one line and write nothing."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import bnrepair
from bnrepair.cli import app
from bnrepair.frameworks.onnx_runtime import cuda_usable
from bnrepair.frameworks.tf_runtime import import_keras
from bnrepair.writers import sha256
from fixtures import ARCH_FLAGS, CALIB, KERAS_STALE, REPO, TORCH_STALE, synthetic

keras, _ = import_keras()
ROOT = REPO
KERAS, TORCH, ARCH = KERAS_STALE, TORCH_STALE, ARCH_FLAGS
cli = CliRunner()


def images(split: str, channels_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x, y = synthetic.load_split("a", split)
    x = x.astype(np.float32) / 255.0
    return (np.transpose(x, (0, 3, 1, 2)).copy() if channels_first else x), y


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(session, x) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("framework", ["keras", "torch"])
def test_fixture_exports_are_valid_traceable_and_match(tmp_path, framework, fold):
    source, extra = (KERAS, []) if framework == "keras" else (TORCH, ARCH)
    out = tmp_path / "model.onnx"
    done = cli.invoke(app, ["export", str(source), "-o", str(out), "--fold" if fold else "--no-fold", "--data",
                            str(CALIB), "--json", str(tmp_path / "r.json"), "-q", *extra])
    assert done.exit_code == 0, done.output
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == (0 if fold else 3)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["bnrepair.source_sha256"] == sha256(source) and meta["bnrepair.version"]
    folded = json.loads(meta["bnrepair.folded"])
    assert len(folded) == (3 if fold else 0)
    initializers = {i.name for i in proto.graph.initializer}
    assert all(name in initializers for names in folded.values() for name in names)

    x, _ = images("heldout", channels_first=framework == "torch")
    if framework == "keras":
        want = keras.models.load_model(source, compile=False).predict(x, verbose=0)
    else:
        import torch

        with torch.no_grad():
            want = bnrepair.load(source, arch=ARCH[1]).module.eval()(torch.as_tensor(x)).numpy()
    s = session(out)
    for n in (1, 7, len(x)):  # any batch size
        assert float(np.abs(run(s, x[:n]) - want[:n]).max()) <= 1e-4
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["inputs"] == "calibration data" and report["samples"] == 64
    assert {c["stage"] for c in report["checks"]} == ({"fold", "onnx"} if fold else {"onnx"})


@pytest.mark.parametrize("framework", ["keras", "torch"])
def test_pipeline_onnx_accuracy_equals_the_recalibrated_model(tmp_path, framework):
    source, suffix, extra = (KERAS, ".h5", []) if framework == "keras" else (TORCH, ".pt", ARCH)
    checkpoint, exported = tmp_path / f"fixed{suffix}", tmp_path / "fixed.onnx"
    done = cli.invoke(app, ["recalibrate", str(source), "--data", str(CALIB), "-o", str(checkpoint), "--export",
                            str(exported), "--fold", "-q", *extra])
    assert done.exit_code == 0, done.output
    meta = {p.key: p.value for p in onnx.load(exported).metadata_props}  # which checkpoint, repaired how
    assert meta["bnrepair.source_sha256"] == sha256(source)
    assert meta["bnrepair.repaired_sha256"] == sha256(checkpoint) != sha256(source)
    assert json.loads(meta["bnrepair.recalibrated"]) == {"mode": "train", "samples": len(images("calib")[0]),
                                                         "seed": 0, "passes": 1}
    x, y = images("heldout", channels_first=framework == "torch")
    if framework == "keras":
        fixed = keras.models.load_model(checkpoint, compile=False).predict(x, verbose=0)
        broken = keras.models.load_model(source, compile=False).predict(x, verbose=0)
    else:
        import torch

        with torch.no_grad():
            fixed = bnrepair.load(checkpoint, arch=ARCH[1]).module.eval()(torch.as_tensor(x)).numpy()
            broken = bnrepair.load(source, arch=ARCH[1]).module.eval()(torch.as_tensor(x)).numpy()
    ours = run(session(exported), x)

    def accuracy(scores):
        return float(np.mean(np.argmax(scores, 1) == y))

    assert accuracy(fixed) > accuracy(broken) + 0.2
    assert accuracy(ours) == accuracy(fixed)
    proto = onnx.load(exported)
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]


def test_fold_writes_the_input_format_by_default_or_onnx(tmp_path):
    source = tmp_path / "stale_ema.h5"
    source.write_bytes(KERAS.read_bytes())
    done = cli.invoke(app, ["fold", str(source), "-q"])
    assert done.exit_code == 0, done.output
    folded = keras.models.load_model(tmp_path / "stale_ema.folded.h5", compile=False)
    assert not [layer for layer in folded.layers if isinstance(layer, keras.layers.BatchNormalization)]
    done = cli.invoke(app, ["fold", str(source), "-o", str(tmp_path / "folded.onnx"), "-q"])
    assert done.exit_code == 0, done.output
    assert not [n for n in onnx.load(tmp_path / "folded.onnx").graph.node if n.op_type == "BatchNormalization"]


@pytest.mark.parametrize("opset", [13, 21])
def test_every_supported_keras_layer_kind_exports(tmp_path, opset):
    import bnrepair

    L = keras.layers
    keras.utils.set_random_seed(0)
    x = keras.Input((12, 12, 3), name="image")
    a = L.ZeroPadding2D(((2, 0), (0, 1)))(L.Conv2D(6, 3, activation="gelu")(x))
    a = L.AveragePooling2D(3, strides=2, padding="same")(L.BatchNormalization()(a))
    b = L.MaxPooling2D(2)(L.LeakyReLU(0.1)(L.Conv2D(6, 3, strides=2, padding="same", activation="silu")(x)))
    b = L.ELU(0.5)(L.Dropout(0.5)(L.Conv2DTranspose(6, 2, strides=2, padding="valid")(b)))
    c = L.ReLU(max_value=6.0)(L.SeparableConv2D(6, 3, strides=2, padding="same", activation="tanh")(x))
    merged = L.Multiply()([L.Maximum()([a, b]), L.Average()([b, c]), L.Subtract()([c, a])])
    pooled = L.GlobalMaxPooling2D(keepdims=True)(merged)
    head = L.Dense(5, activation="hard_sigmoid")(L.Flatten()(L.Reshape((2, 3))(L.Flatten()(pooled))))
    out = L.Softmax()(L.Activation("selu")(L.Dense(4, activation="softplus")(head)))
    model = keras.Model(x, [out, L.GlobalAveragePooling2D()(merged)])
    report = bnrepair.export(model, tmp_path / "kinds.onnx", opset=opset,
                             data=np.random.default_rng(0).normal(size=(16, 12, 12, 3)).astype(np.float32))
    assert [c.max_abs <= 1e-4 for c in report.checks] == [True, True]
    assert onnx.load(tmp_path / "kinds.onnx").opset_import[0].version == opset


def failure(result, paths):
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not any(p.exists() for p in paths)
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]


def test_out_of_tolerance_fails_and_writes_nothing(tmp_path):
    out = tmp_path / "model.onnx"
    result = cli.invoke(app, ["export", str(KERAS), "-o", str(out), "--fold", "--atol", "0", "--rtol", "0",
                              "--noise-margin", "0"])
    failure(result, [out])
    assert "verification failed" in result.output and "nothing written" in result.output


def test_a_layer_the_emitter_lacks_goes_through_tf2onnx_in_the_pipeline(tmp_path):
    """LayerNormalization, which bnrepair's emitter lacks, in recalibrate --export: tf2onnx converts the
    recalibrated model, and the ONNX computes what it computes."""
    x = keras.Input((6,), name="v")
    y = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(4, name="d")(x))
    keras.Model(x, keras.layers.LayerNormalization(name="ln")(y)).save(tmp_path / "ln.keras")
    data = np.random.default_rng(0).random((40, 6), dtype=np.float32)
    np.save(tmp_path / "x.npy", data)
    out, fixed = tmp_path / "ln.onnx", tmp_path / "fixed.keras"
    result = cli.invoke(app, ["recalibrate", str(tmp_path / "ln.keras"), "--data", str(tmp_path / "x.npy"), "-o",
                              str(fixed), "--export", str(out), "-q"])
    assert result.exit_code == 0, result.output
    want = keras.models.load_model(fixed, compile=False)(data, training=False).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: data})[0], want, atol=1e-5)


@pytest.mark.parametrize("args", [
    ["recalibrate", str(KERAS), "--data", str(CALIB), "-o", "{tmp}/fixed.h5", "--fold"],
    ["fold", str(KERAS), "-o", "{tmp}/model.pt2"],
    ["export", str(KERAS), "-o", "{tmp}/model.h5"],
    ["export", str(KERAS), "-o", "{tmp}/model.onnx", "--opset", "9"],
])
def test_bad_options_are_one_line_errors(tmp_path, args):
    result = cli.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not list(tmp_path.iterdir())


def test_generated_inputs_need_a_declared_shape(tmp_path):
    import torch

    import bnrepair
    from bnrepair.errors import InputError

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with pytest.raises(InputError, match="does not declare its full input shape"):
        bnrepair.export(module, tmp_path / "m.onnx", fold=True)
    assert not list(tmp_path.iterdir())


def test_no_warnings_without_a_usable_gpu(tmp_path):
    """onnxruntime-gpu on a machine whose CUDA provider cannot start must fall back without a word."""
    done = subprocess.run([sys.executable, "-m", "bnrepair.cli", "export", str(TORCH), *ARCH, "-o",
                           str(tmp_path / "m.onnx"), "--fold", "-q"], capture_output=True, text=True, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, done.stderr
    if not cuda_usable():
        assert done.stderr == ""


def test_image_size_serves_generated_verification_inputs(tmp_path):
    """A module that declares no input shape: --image-size gives the generated inputs theirs, with no --data; the
    ONNX runs in onnxruntime as torch runs the checkpoint."""
    import torch

    (tmp_path / "net.py").write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, "
                                     "3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")
    arch = f"{tmp_path / 'net.py'}:build"
    from importlib.util import module_from_spec, spec_from_file_location

    torch.manual_seed(0)
    spec = spec_from_file_location("net", tmp_path / "net.py")
    net = module_from_spec(spec)
    spec.loader.exec_module(net)
    module = net.build().eval()
    module[1].running_mean.normal_()
    torch.save(module.state_dict(), tmp_path / "m.pt")
    out = tmp_path / "s.onnx"
    done = CliRunner().invoke(app, ["export", str(tmp_path / "m.pt"), "--arch", arch, "--fold", "--image-size", "32",
                                    "32", "-o", str(out), "--json", str(tmp_path / "r.json"), "-q"])
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert "generated" in report["inputs"] and report["folded"]
    x = np.random.default_rng(5).random((2, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        want = module(torch.as_tensor(x)).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
