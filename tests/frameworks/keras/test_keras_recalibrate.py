"""Recalibrating real Keras models: exact statistics, modes, determinism, and patch-only writers."""

import json
import re
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import bnrepair
from bnrepair.cli import app
from bnrepair.data import Calibration, ImageSpec, open_source
from bnrepair.errors import InputError
from bnrepair.frameworks.tf_runtime import import_keras
from bnrepair.moments import Moments
from bnrepair.protocols import NoProgress
from bnrepair.recalibration import pooled_moments
from fixtures import REPO

keras, tf = import_keras()
cli = CliRunner()


def conv_model(name="net", channels_first=False, nested=False):
    keras.utils.set_random_seed(0)
    fmt = "channels_first" if channels_first else "channels_last"
    axis = 1 if channels_first else -1
    inp = keras.Input((3, 8, 8) if channels_first else (8, 8, 3))
    x = keras.layers.Conv2D(4, 3, data_format=fmt, name="conv1")(inp)
    x = keras.layers.BatchNormalization(axis=axis, momentum=0.999, name="bn1")(x)
    x = keras.layers.ReLU()(x)
    if nested:
        inner_in = keras.Input(x.shape[1:])
        y = keras.layers.Conv2D(5, 3, data_format=fmt, name="conv2")(inner_in)
        y = keras.layers.BatchNormalization(axis=axis, name="bn2")(y)
        x = keras.Model(inner_in, keras.layers.ReLU()(y), name="block")(x)
    else:
        x = keras.layers.Conv2D(5, 3, data_format=fmt, name="conv2")(x)
        x = keras.layers.BatchNormalization(axis=axis, name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D(data_format=fmt)(x)
    x = keras.layers.Dense(3, name="dense")(x)
    out = keras.layers.BatchNormalization(name="bn3")(x)
    return keras.Model(inp, out, name=name)


def trained(model, shape):
    """A step of training so the file carries optimizer state too."""
    model.compile("adam", "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((16, *shape), dtype=np.float32), rng.random((16, 3), dtype=np.float32), verbose=0)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("keras")
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 2.0, (70, 8, 8, 3)).astype(np.float32)
    np.save(root / "x.npy", x)
    np.save(root / "x_cf.npy", np.transpose(x, (0, 3, 1, 2)).copy())
    paths = {"x": root / "x.npy", "x_cf": root / "x_cf.npy"}
    model = trained(conv_model(), (8, 8, 3))
    for suffix in ("h5", "keras"):
        paths[suffix] = root / f"net.{suffix}"
        model.save(paths[suffix])
    paths["nested"] = root / "nested.keras"
    trained(conv_model(nested=True), (8, 8, 3)).save(paths["nested"])
    paths["nested_h5"] = root / "nested.h5"
    keras.models.load_model(paths["nested"]).save(paths["nested_h5"])
    paths["cf"] = root / "cf.h5"
    trained(conv_model(channels_first=True), (3, 8, 8)).save(paths["cf"])
    return paths


def stats_of(runner):
    return {bn.id: (bn.mean.copy(), bn.var.copy()) for bn in runner.graph.bn_layers}


def test_first_layer_equals_numpy_over_the_whole_set(files):
    runner = bnrepair.load(files["h5"])
    conv_out = keras.Model(runner.model.inputs, runner.model.get_layer("conv1").output)
    x = np.load(files["x"])
    expected = Moments.from_array(np.asarray(conv_out(x), np.float64), -1)
    bnrepair.recalibrate(runner, files["x"], batch_size=16, mode="train")
    bn1 = runner.graph.layer("bn1")
    np.testing.assert_allclose(bn1.mean, expected.mean, rtol=1e-5)
    np.testing.assert_allclose(bn1.var, expected.variance(unbiased=False), rtol=1e-5)
    np.testing.assert_allclose(runner.model.get_layer("bn1").moving_variance.numpy(), bn1.var, rtol=1e-6)


def test_eval_mode_is_independent_of_batch_size_order_and_prior_stats(files):
    first = bnrepair.load(files["keras"])
    report = bnrepair.recalibrate(first, files["x"], mode="eval", batch_size=7, seed=0)
    assert report.converged and report.passes <= len(first.graph.bn_layers) + 1
    second = bnrepair.load(files["keras"])
    rng = np.random.default_rng(5)
    second.set_stats({bn.id: (rng.normal(size=bn.channels), rng.uniform(0.1, 9, bn.channels))
                      for bn in second.graph.bn_layers})
    bnrepair.recalibrate(second, files["x"], mode="eval", batch_size=32, seed=11)
    for layer_id, (mean, var) in stats_of(first).items():
        np.testing.assert_allclose(second.graph.layer(layer_id).mean, mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(second.graph.layer(layer_id).var, var, rtol=1e-4)


def test_uneven_batches_give_the_same_pooled_moments(files):
    runner = bnrepair.load(files["h5"])
    ids = [bn.id for bn in runner.graph.bn_layers]
    source = open_source(files["x"], ImageSpec())
    even, _ = pooled_moments(runner, Calibration(source, batch_size=10), "eval", ids, NoProgress())
    uneven, _ = pooled_moments(runner, Calibration(source, batch_size=32), "eval", ids, NoProgress())
    for layer_id in ids:
        assert even[layer_id].count == uneven[layer_id].count
        std = np.sqrt(even[layer_id].m2 / even[layer_id].count)  # float32 reductions err in units of the spread
        np.testing.assert_allclose(uneven[layer_id].mean, even[layer_id].mean, rtol=1e-5, atol=float(std.max()) * 1e-5)
        np.testing.assert_allclose(uneven[layer_id].m2, even[layer_id].m2, rtol=1e-5)


def test_train_mode_ignores_prior_stats_and_survives_a_batch_of_one(files):
    a, b = bnrepair.load(files["h5"]), bnrepair.load(files["h5"])
    b.set_stats({bn.id: (np.full(bn.channels, 7.0), np.full(bn.channels, 0.01)) for bn in b.graph.bn_layers})
    for runner in (a, b):  # 33 samples in batches of 32: the last batch has one sample
        bnrepair.recalibrate(runner, files["x"], batch_size=32, samples=33, mode="train")
    for layer_id, (mean, var) in stats_of(a).items():
        np.testing.assert_allclose(b.graph.layer(layer_id).mean, mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b.graph.layer(layer_id).var, var, rtol=1e-5)
        assert np.isfinite(var).all()


def test_dropout_before_bn_gets_dropout_off_statistics():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = keras.layers.Dense(5, name="dense")(inp)
    out = keras.layers.BatchNormalization(name="bn")(keras.layers.Dropout(0.5)(h))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(2.0, 1.0, (64, 6)).astype(np.float32)
    expected = Moments.from_array(np.asarray(model.get_layer("dense")(x), np.float64), -1)
    bnrepair.recalibrate(model, x, batch_size=16)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected.mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), expected.variance(False), rtol=1e-5)


def h5_contents(f):
    """Every dataset's bytes and every attribute, by path."""
    def attributes(obj):
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in obj.attrs.items()}

    items = {"/": attributes(f)}

    def visit(name, obj):
        attrs = attributes(obj)
        items[name] = (obj[()].tobytes(), attrs) if isinstance(obj, h5py.Dataset) else attrs

    f.visititems(visit)
    return items


def open_weights(path):
    import io

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return h5py.File(io.BytesIO(z.read("model.weights.h5")), "r")
    return h5py.File(path, "r")


@pytest.mark.parametrize("name,data", [("h5", "x"), ("keras", "x"), ("nested", "x"), ("nested_h5", "x"),
                                       ("cf", "x_cf")])
def test_only_the_statistics_change_in_the_output(files, tmp_path, name, data):
    source, output = files[name], tmp_path / f"out{files[name].suffix}"
    before = files[name].read_bytes()
    result = cli.invoke(app, ["recalibrate", str(source), "--data", str(files[data]), "-o", str(output), "-q"])
    assert result.exit_code == 0, result.output
    assert files[name].read_bytes() == before
    runner = bnrepair.load(source)
    changed = {loc for bn in runner.graph.bn_layers for loc in bn.locations.values()}
    assert len(changed) == 2 * len(runner.graph.bn_layers) == 6
    with open_weights(source) as fin, open_weights(output) as fout:
        old, new = h5_contents(fin), h5_contents(fout)
    assert old.keys() == new.keys()
    differing = {path for path in old if old[path] != new[path]}
    assert differing == changed
    if source.suffix == ".keras":
        with zipfile.ZipFile(source) as zin, zipfile.ZipFile(output) as zout:
            assert [i.filename for i in zin.infolist()] == [i.filename for i in zout.infolist()]
            for info in zin.infolist():
                if info.filename != "model.weights.h5":
                    assert zin.read(info) == zout.read(info.filename)
    reloaded = keras.models.load_model(output, compile=False)
    recalibrated = bnrepair.load(output)
    for bn in recalibrated.graph.bn_layers:
        assert not np.array_equal(bn.var, runner.graph.layer(bn.id).var)
    assert reloaded.predict(np.load(files[data])[:4], verbose=0).shape == (4, 3)


def test_same_seed_gives_bit_identical_files_and_json_metadata(files, tmp_path):
    outputs = []
    for i in range(2):
        out = tmp_path / f"o{i}.keras"
        args = ["recalibrate", str(files["keras"]), "-d", str(files["x"]), "-o", str(out), "--seed", "3",
                "-b", "8", "--json", str(tmp_path / f"r{i}.json"), "-q"]
        assert cli.invoke(app, args).exit_code == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    report = json.loads((tmp_path / "r0.json").read_text())
    import hashlib

    assert report["output_sha256"] == hashlib.sha256(outputs[0]).hexdigest()
    assert report["input_sha256"] == hashlib.sha256(files["keras"].read_bytes()).hexdigest()
    assert report["samples"] == 70 and report["seed"] == 3 and report["mode"] == "train"
    assert [layer["id"] for layer in report["layers"]] == ["bn1", "bn2", "bn3"]


def test_layer_selection_leaves_the_rest_untouched(files, tmp_path):
    out = tmp_path / "sel.h5"
    result = cli.invoke(app, ["recalibrate", str(files["h5"]), "-d", str(files["x"]), "-o", str(out),
                              "--skip", "bn[23]", "-q"])
    assert result.exit_code == 0, result.output
    before, after = bnrepair.load(files["h5"]), bnrepair.load(out)
    assert not np.array_equal(after.graph.layer("bn1").mean, before.graph.layer("bn1").mean)
    for layer_id in ("bn2", "bn3"):
        np.testing.assert_array_equal(after.graph.layer(layer_id).mean, before.graph.layer(layer_id).mean)


def test_default_output_name_beside_the_input(files, tmp_path):
    source = tmp_path / "model.h5"
    source.write_bytes(files["h5"].read_bytes())
    assert cli.invoke(app, ["recalibrate", str(source), "-d", str(files["x"]), "-q"]).exit_code == 0
    assert (tmp_path / "model.recalibrated.h5").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.h5", "model.recalibrated.h5"]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(files["h5"].read_bytes()[:3000])
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"hello world")
    no_bn = tmp_path / "nobn.keras"
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(2)(inp)).save(no_bn)
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "wrong.npy", np.zeros((8, 5, 5, 3), np.float32))
    np.save(tmp_path / "inf.npy", np.full((8, 8, 8, 3), np.inf, np.float32))
    cases = [
        ([str(tmp_path / "missing.h5"), "-d", str(files["x"])], "missing.h5: no such file"),
        ([str(junk), "-d", str(files["x"])], "junk.h5: not a Keras file (neither HDF5 nor a zip archive)"),
        ([str(truncated), "-d", str(files["x"])], "truncated.h5"),
        ([str(no_bn), "-d", str(files["x"])], "no BatchNormalization layers"),
        ([str(files["h5"]), "-d", str(tmp_path / "empty")], "empty: no images found"),
        ([str(files["h5"]), "-d", str(tmp_path / "wrong.npy")], "wrong.npy: samples have shape (5, 5, 3)"),
        ([str(files["h5"]), "-d", str(tmp_path / "inf.npy")], "sample holds NaN or infinite"),
        ([str(files["h5"]), "-d", str(files["x"]), "--samples", "1"], "--samples"),
        ([str(files["h5"]), "-d", str(files["x"]), "-o", str(files["h5"])], "overwrite the input"),
        ([str(files["h5"]), "-d", str(files["x"]), "--layers", "nothing"], "--layers 'nothing' leave(s) none of the"),
        ([str(files["h5"]), "-d", str(files["x"]), "--mode", "fast"], "--mode must be one of"),
        ([str(files["h5"]), "-d", str(files["x"]), "--device", "gpu"], "TensorFlow sees no GPU"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        output = str(tmp_path / f"out{Path(args[0]).suffix}")
        result = cli.invoke(app, ["recalibrate", *args, "-o", output] if "-o" not in args else ["recalibrate", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (message, result.output)
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_help_does_not_import_a_framework():
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from bnrepair.cli import app; "
            "r = CliRunner().invoke(app, ['recalibrate', '--help']); assert r.exit_code == 0, r.output; "
            "assert 'Exit codes' in r.output; "
            "print(sorted(m for m in ('tensorflow', 'torch', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


CUSTOM_LAYER = '''
import keras


@keras.saving.register_keras_serializable(package="bnrepair_test_{tag}")  # registered once per process
class Shift(keras.layers.Layer):
    def call(self, x):
        return x + 1.0


def build(path):
    inp = keras.Input((4,))
    x = keras.layers.BatchNormalization(name="bn")(Shift(name="shift")(inp))
    keras.Model(inp, x).save(path)
'''


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_custom_objects_file_loads_custom_layers(tmp_path, suffix):
    """Without --custom-objects, the one line names the class and the flag, for the legacy .h5 too."""
    import subprocess
    import sys

    module = tmp_path / "layers.py"
    module.write_text(CUSTOM_LAYER.replace("{tag}", suffix[1:]))
    model = tmp_path / f"custom{suffix}"
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
                    f"import layers; layers.build({str(model)!r})"], check=True, capture_output=True)
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    out = tmp_path / f"out{suffix}"
    args = ["recalibrate", str(model), "-d", str(tmp_path / "v.npy"), "-o", str(out), "-q"]
    refused = cli.invoke(app, args)
    assert refused.exit_code == 2 and "Keras could not load the model" in refused.output
    assert re.search(r"does not know, '(bnrepair_test_\w+>)?Shift'; give the Python file that defines it with "
                     "--custom-objects", refused.output), refused.output  # .h5 names the registered name
    assert not out.exists()
    result = cli.invoke(app, args + ["--custom-objects", str(module)])
    assert result.exit_code == 0, result.output
    bn = bnrepair.load(out, custom_objects=module).graph.layer("bn")
    np.testing.assert_allclose(bn.mean, np.load(tmp_path / "v.npy").mean(axis=0) + 1.0, rtol=1e-5)


def test_lambda_bytecode_needs_unsafe(tmp_path):
    inp = keras.Input((3,))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inp)
    model = keras.Model(inp, keras.layers.BatchNormalization(name="bn")(x))
    model.save(tmp_path / "lambda.keras")
    np.save(tmp_path / "v.npy", np.ones((4, 3), np.float32) * np.arange(4, dtype=np.float32)[:, None])
    args = ["recalibrate", str(tmp_path / "lambda.keras"), "-d", str(tmp_path / "v.npy"), "-q",
            "-o", str(tmp_path / "out.keras")]
    refused = cli.invoke(app, args)
    assert refused.exit_code == 2 and "--unsafe" in refused.output
    assert not (tmp_path / "out.keras").exists()
    allowed = cli.invoke(app, args + ["--unsafe"])
    assert allowed.exit_code == 0, allowed.output
    np.testing.assert_allclose(bnrepair.load(tmp_path / "out.keras", unsafe=True).graph.layer("bn").mean, 3.0)


def test_non_finite_activations_are_a_clear_error(files, tmp_path):
    np.save(tmp_path / "huge.npy", np.full((8, 8, 8, 3), 3e38, np.float32))
    result = cli.invoke(app, ["recalibrate", str(files["h5"]), "-d", str(tmp_path / "huge.npy"),
                              "-o", str(tmp_path / "o.h5")])
    assert result.exit_code == 2 and "NaN or infinite activations" in result.output
    assert not (tmp_path / "o.h5").exists()


SHIPPED = REPO / "fixtures" / "keras"


@pytest.mark.parametrize("name", ["tf_keras_v2.h5", "nested.keras", "nested.h5", "channels_first.h5",
                                  "channels_first.keras", "dropout_bn.h5"])
def test_shipped_format_fixtures_change_only_their_statistics(tmp_path, name):
    """Keras 2 (tf_keras: ``:0`` names, optimizer_weights, training_config), nested and channels_first files
    written by the fixture script, recalibrated from the image folder through the CLI."""
    source, output = SHIPPED / name, tmp_path / f"out{Path(name).suffix}"
    calib = SHIPPED.parent / "data" / "a" / "calib"
    result = cli.invoke(app, ["recalibrate", str(source), "--data", str(calib), "-o", str(output), "-q"])
    assert result.exit_code == 0, result.output
    runner = bnrepair.load(source)
    changed = {loc for bn in runner.graph.bn_layers for loc in bn.locations.values()}
    with open_weights(source) as fin, open_weights(output) as fout:
        old, new = h5_contents(fin), h5_contents(fout)
        if name == "tf_keras_v2.h5":
            assert "optimizer_weights" in fin and "training_config" in fin.attrs
            assert all(loc.endswith(":0") for loc in changed)
    assert {path for path in old if old[path] != new[path]} == changed
    for bn in bnrepair.load(output).graph.bn_layers:
        assert not np.allclose(bn.var, runner.graph.layer(bn.id).var)
    keras.models.load_model(output, compile=False)


def test_bn_layer_called_twice_pools_both_calls():
    """A shared BN layer's moving averages see every call during training; recalibration pools them too."""
    a, b = keras.Input((3,), name="a"), keras.Input((3,), name="b")
    bn = keras.layers.BatchNormalization(name="shared_bn")
    model = keras.Model({"a": a, "b": b}, keras.layers.Add()([bn(a), bn(b)]))
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(0, 1, (40, 3)).astype(np.float32), rng.normal(5, 3, (40, 3)).astype(np.float32)
    batches = [{"a": xa[i:i + 16], "b": xb[i:i + 16]} for i in range(0, 40, 16)]
    bnrepair.recalibrate(model, batches, mode="eval")
    expected = Moments.from_array(np.concatenate([xa, xb]).astype(np.float64), -1)
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected.mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), expected.variance(False), rtol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_masked_positions_are_left_out_as_keras_bn_leaves_them_out(mode):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 12, 40)
    x = rng.normal([1.5, 5.0], [1.0, 2.0], (40, 12, 2)).astype(np.float32)
    for row, n in zip(x, lengths):
        row[n:] = 0.0  # padding, which Masking turns into a mask
    inputs = keras.Input((12, 2))
    bn = keras.layers.BatchNormalization(name="bn")
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling1D()(bn(keras.layers.Masking(0.0)(inputs))))
    bnrepair.recalibrate(model, x, batch_size=16, mode=mode)
    valid = np.concatenate([row[:n] for row, n in zip(x.astype(np.float64), lengths)])
    np.testing.assert_allclose(bn.moving_mean.numpy(), valid.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), valid.var(0), rtol=1e-4)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_mean_far_larger_than_the_spread_keeps_float32_relative_precision(mode):
    """Inception-like activations: means 3e4 to 3e5 times the spread, through the fused train kernel and the eval
    reduction; float64 reference over the same float32 inputs."""
    x = (np.random.default_rng(5).normal(0, 1, (1024, 7, 7, 3)) + [3e4, -1e5, 3e5]).astype(np.float32)
    inputs = keras.Input((7, 7, 3))
    bn = keras.layers.BatchNormalization()
    bnrepair.recalibrate(keras.Model(inputs, bn(inputs)), x, batch_size=128, mode=mode)
    flat = x.astype(np.float64).reshape(-1, 3)
    np.testing.assert_allclose(bn.moving_variance.numpy(), flat.var(0), rtol=1e-5)
    last_bits = 2 * np.spacing(np.abs(flat.mean(0)).astype(np.float32))
    assert np.all(np.abs(bn.moving_mean.numpy() - flat.mean(0)) <= last_bits)


@pytest.mark.parametrize("options", [{"renorm": True}, {"synchronized": True}])
def test_renorm_and_synchronized_layers_get_the_statistics_inference_uses(options):
    """Keras's renorm and synchronized BN normalise at inference with moving_mean / moving_variance, as plain BN
    does: those are recalibrated (a renorm layer's own renorm_* averages only serve training)."""
    rng = np.random.default_rng(3)
    x = rng.normal([2.0, -3.0, 0.5, 8.0], [1.0, 2.0, 0.3, 4.0], (96, 4)).astype(np.float32)
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(5, name="dense")
    bn1 = keras.layers.BatchNormalization(name="bn1", **options)
    bn2 = keras.layers.BatchNormalization(name="bn2", **options)
    model = keras.Model(inputs, bn2(keras.layers.ReLU()(dense(bn1(inputs)))))
    report = bnrepair.recalibrate(model, x, batch_size=32, mode="eval")
    assert [layer.id for layer in report.layers] == ["bn1", "bn2"] and report.converged
    np.testing.assert_allclose(bn1.moving_mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-5)
    # the fixed point, independently: bn2's input with bn1 normalising by the whole set's statistics
    w, b = (v.numpy().astype(np.float64) for v in dense.weights)
    gamma, beta = (v.numpy().astype(np.float64) for v in (bn1.gamma, bn1.beta))
    h = np.maximum(((x - x.mean(0)) / np.sqrt(x.var(0) + bn1.epsilon) * gamma + beta) @ w + b, 0.0)
    np.testing.assert_allclose(bn2.moving_mean.numpy(), h.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn2.moving_variance.numpy(), h.var(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["recalibrate", "{model}", "-d", "{calib}", "--mode", "evel"], "--mode must be one of train, eval"),
    (["recalibrate", "{model}", "-d", "{calib}", "--device", "tpu"], "--device must be one of"),
    (["recalibrate", "{model}", "-d", "{empty}"], "no images found"),
    (["recalibrate", "{model}", "-d", "{image}"], "calibration data must be an image folder, a .npy or a .npz"),
    (["export", "{model}", "-o", "{out}", "--opset", "99"], "--opset must be between"),
    (["fold", "{model}", "-o", "{pt}"], "a folded keras model is written as .keras, .h5 or .onnx"),
    (["recalibrate", "{model}", "-d", "{calib}", "--mode", "eval", "--cache-mb", "-1"], "--cache-mb must be >= 0"),
])
def test_option_mistakes_are_refused_before_tensorflow_loads(tmp_path, files, args, message):
    """Each of these waited for TensorFlow to load (5-10 s) before saying one line."""
    import subprocess
    import sys

    from fixtures import CALIB

    (tmp_path / "empty").mkdir()
    image = next(Path(CALIB).rglob("*.png"))
    args = [a.format(model=files["h5"], calib=CALIB, empty=tmp_path / "empty", image=image, out=tmp_path / "m.onnx",
                     pt=tmp_path / "x.pt")
            for a in args]
    code = ("import sys; from typer.testing import CliRunner; from bnrepair.cli import app; "
            f"r = CliRunner().invoke(app, {args!r}); print(r.exit_code, 'tensorflow' in sys.modules); "
            "print(r.output)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    status, output = done.stdout.split("\n", 1)
    assert status == "2 False" and message in output, done.stdout


def test_an_endless_tf_data_dataset_is_refused_unless_samples_caps_it():
    """``ds.repeat()`` never ends, and tf.data says so (infinite cardinality): refused in one line instead of a
    run that never returns; with ``samples`` it is read that far, as any endless loader is."""
    model = conv_model()
    x = np.random.default_rng(2).normal(0.5, 2.0, (40, 8, 8, 3)).astype(np.float32)
    endless = tf.data.Dataset.from_tensor_slices(x).batch(10).repeat()
    with pytest.raises(InputError, match="repeats forever .* give samples=N"):
        bnrepair.recalibrate(model, endless)
    report = bnrepair.recalibrate(model, endless, samples=40)
    twin = conv_model()
    bnrepair.recalibrate(twin, x)  # the same 40 samples as an array: the first BN's statistics are the same
    assert report.samples == 40
    np.testing.assert_allclose(model.get_layer("bn1").moving_mean.numpy(), twin.get_layer("bn1").moving_mean.numpy(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_model_called_again_is_not_traced_again(mode):
    """Called once per epoch as update_bn is, a second recalibration of the same model reuses the first one's traced
    functions (and their corrections' variables, in eval mode), and computes what a fresh twin computes; a batch of
    another shape traces anew."""
    model, twin = conv_model(), conv_model()
    rng = np.random.default_rng(3)
    first, second = (rng.normal(0.5, 2.0, (40, 8, 8, 3)).astype(np.float32) for _ in range(2))
    bnrepair.recalibrate(model, first, mode=mode, batch_size=10)
    functions = dict(model._bnrepair_captures["functions"])
    traces = {key: f.experimental_get_tracing_count() for key, f in functions.items()}
    bnrepair.recalibrate(model, second, mode=mode, batch_size=10)
    assert model._bnrepair_captures["functions"] == functions
    assert {key: f.experimental_get_tracing_count() for key, f in functions.items()} == traces
    bnrepair.recalibrate(twin, second, mode=mode, batch_size=10)
    for name in ("bn1", "bn2"):
        for stat in ("moving_mean", "moving_variance"):
            np.testing.assert_allclose(getattr(model.get_layer(name), stat).numpy(),
                                       getattr(twin.get_layer(name), stat).numpy(), rtol=1e-5, atol=1e-6)

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    open_sized = keras.Model(inp, keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inp)))
    for size in (8, 8, 6):  # the same shape reuses its trace, another traces anew
        bnrepair.recalibrate(open_sized, second[:, :size, :size], mode=mode, batch_size=10)
    assert len({key[-1] for key in open_sized._bnrepair_captures["functions"]}) == 2
