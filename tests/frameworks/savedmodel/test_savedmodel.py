"""Recalibrating TensorFlow SavedModels (Keras 3 export / tf.saved_model.save, Keras 2, TF1 Builder)
against the real TensorFlow loader: repaired accuracy, agreement with the Keras path, patch-only output."""

import filecmp
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import bnrepair
from bnrepair.cli import app
from bnrepair.errors import BnrepairError, InputError
from bnrepair.frameworks.tf_runtime import import_keras
from fixtures import make_savedmodel

keras, tf = import_keras()
tf.get_logger().setLevel("ERROR")  # TF1 ref variables warn on every tf.saved_model.load

FIXTURES = make_savedmodel.OUT
CALIB = Path(make_savedmodel.synthetic.folder("a", "calib"))
CASES = {  # SavedModel -> (its Keras twin, loader options)
    "keras3_export": ("keras3_export.keras", {}),
    "keras3_tfsave": ("keras3_tfsave.keras", {}),
    "tf_keras": ("tf_keras.h5", {}),
    "tf1_slim": (None, {"input_name": "images"}),
}
KERAS_CASES = [name for name, (twin, _) in CASES.items() if twin]


@pytest.fixture(scope="module")
def heldout():
    return make_savedmodel.heldout()


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """Each fixture recalibrated once (train mode) through the SavedModel path: name -> (output, report)."""
    done = {}

    def get(name):
        if name not in done:
            output = tmp_path_factory.mktemp("sm") / name
            done[name] = output, bnrepair.recalibrate(FIXTURES / name, CALIB, output=output, **CASES[name][1])
        return done[name]

    return get


def serving_scores(path, x) -> np.ndarray:
    """The serving signature's logits, through TensorFlow's own loader (TF1 ``temperature`` fed as 1)."""
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    specs = signature.structured_input_signature[1]
    outputs = signature(**{name: tf.constant(x) if spec.shape.rank == 4 else tf.constant(1.0)
                           for name, spec in specs.items()})
    return (outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))).numpy()


def accuracy(scores, labels) -> float:
    return float(np.mean(np.argmax(scores, axis=-1) == labels))


def train_mode_accuracy(name, x, y) -> float:
    """Held-out accuracy with BN on batch statistics, from the framework that built the model."""
    twin = CASES[name][0]
    if twin is None:
        logits = tf.saved_model.load(str(FIXTURES / name)).signatures["train_mode"](images=tf.constant(x))["logits"]
        return accuracy(logits.numpy(), y)
    return accuracy(keras.models.load_model(FIXTURES / twin, compile=False)(x, training=True).numpy(), y)


def checkpoint(path):
    reader = tf.train.load_checkpoint(str(Path(path) / "variables" / "variables"))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_dtype_map()}


def variable_names(path) -> dict[str, str]:
    """checkpoint key -> variable name, from a TF2 checkpoint's own object graph (TF1 keys are names)."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    stored = checkpoint(path)
    graph.ParseFromString(stored.get("_CHECKPOINTABLE_OBJECT_GRAPH", b""))
    names = {a.checkpoint_key: a.full_name for node in graph.nodes for a in node.attributes}
    return {key: names.get(key, key) for key in stored}


def same(a, b) -> bool:
    return a == b if isinstance(a, bytes) else np.asarray(a).tobytes() == np.asarray(b).tobytes()


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.mark.filterwarnings("ignore:The structure of `inputs`")  # Keras 3 reading tf_keras.h5
@pytest.mark.parametrize("name", CASES)
def test_repaired_serving_accuracy_matches_training_mode(name, repaired, heldout):
    x, y = heldout
    before = accuracy(serving_scores(FIXTURES / name, x), y)
    output, report = repaired(name)
    after = accuracy(serving_scores(output, x), y)
    trained = train_mode_accuracy(name, x, y)
    print(f"{name}: inference before {before:.1%}, training mode {trained:.1%}, after {after:.1%}")
    assert report.framework == "savedmodel" and len(report.layers) >= 3
    assert before < 0.5 and trained > 0.85
    assert abs(after - trained) <= 0.02


@pytest.mark.parametrize("name", KERAS_CASES)
def test_savedmodel_path_equals_keras_path(name, repaired, heldout, tmp_path):
    x, y = heldout
    output, _ = repaired(name)
    twin = CASES[name][0]
    keras_output = tmp_path / f"repaired{Path(twin).suffix}"
    bnrepair.recalibrate(FIXTURES / twin, CALIB, output=keras_output)
    model = keras.models.load_model(keras_output, compile=False)
    assert accuracy(serving_scores(output, x), y) == accuracy(model.predict(x, verbose=0), y)
    for bn in bnrepair.load(output).graph.bn_layers:  # ids are the Keras layer names
        layer = model.get_layer(bn.id)
        std = np.sqrt(bn.var)
        np.testing.assert_array_less(np.abs(bn.mean - layer.moving_mean.numpy()) / std, 1e-4)
        np.testing.assert_allclose(bn.var, layer.moving_variance.numpy(), rtol=1e-4)


@pytest.mark.parametrize("name", KERAS_CASES)
def test_eval_mode_equals_keras_eval_mode(name, tmp_path):
    twin = CASES[name][0]
    report = bnrepair.recalibrate(FIXTURES / name, CALIB, output=tmp_path / "sm", mode="eval")
    keras_report = bnrepair.recalibrate(FIXTURES / twin, CALIB, output=tmp_path / f"k{Path(twin).suffix}",
                                        mode="eval")
    assert report.converged and report.passes == keras_report.passes
    model = keras.models.load_model(tmp_path / f"k{Path(twin).suffix}", compile=False)
    for bn in bnrepair.load(tmp_path / "sm").graph.bn_layers:  # both within --tol (1e-4 std) of the fixed point
        twin_bn = model.get_layer(bn.id)
        scale = twin_bn.moving_variance.numpy() + twin_bn.epsilon
        assert np.max(np.abs(bn.mean - twin_bn.moving_mean.numpy()) / np.sqrt(scale)) < 1e-4
        assert np.max(np.abs(bn.var - twin_bn.moving_variance.numpy()) / scale) < 2e-4


@pytest.mark.parametrize("name", KERAS_CASES)
def test_a_drift_corrected_batch_is_measured_as_keras_measures_it(name, heldout):
    """Eval mode's corrected passes (``drift.corrected``) rewire fused BN ops (tf_keras's convolutions) and
    unfused ones (Keras 3, tf_keras's Dense) alike: each layer normalises with the batch's moments carried by
    its correction, so the moments downstream agree with the Keras twin's, and differ from a plain pass's."""
    x = heldout[0][:32]
    runners = bnrepair.load(FIXTURES / name), bnrepair.load(FIXTURES / CASES[name][0])
    ids = [bn.id for bn in runners[0].graph.bn_layers]
    plain = runners[1].collect(x, "eval", ids)
    rng = np.random.default_rng(0)
    corrections = {i: (rng.normal(0, 0.5, m.mean.shape) * np.sqrt(m.variance(False)),
                       m.variance(False) + 1e-3, m.variance(False) * rng.uniform(0.5, 2, m.mean.shape) + 1e-3)
                   for i, m in plain.items()}
    measured = [r.collect(x, "eval", ids, frozenset(ids), corrections) for r in runners]
    for i in ids:
        np.testing.assert_allclose(measured[0][i].mean, measured[1][i].mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(measured[0][i].variance(False), measured[1][i].variance(False), rtol=1e-4)
    moved = [np.abs(measured[0][i].mean - plain[i].mean).max() / np.sqrt(plain[i].variance(False).max())
             for i in ids[1:]]
    assert min(moved) > 1e-2, moved


@pytest.mark.parametrize("name", CASES)
def test_only_bn_statistics_change(name, repaired):
    source = FIXTURES / name
    digest = tree_digest(source)
    output, _ = repaired(name)
    files = sorted(p.relative_to(source) for p in source.rglob("*"))
    assert files == sorted(p.relative_to(output) for p in output.rglob("*"))
    for rel in files:
        if (source / rel).is_file() and not rel.parts[-1].startswith("variables."):
            assert filecmp.cmp(source / rel, output / rel, shallow=False), rel
    before, after = checkpoint(source), checkpoint(output)
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not same(before[k], after[k]))
    runner = bnrepair.load(output, **CASES[name][1])
    located = {bn.locations[stat] for bn in runner.graph.bn_layers for stat in ("mean", "var")}
    assert located <= set(changed)
    # Keras 3's export saves each variable twice; both copies hold the new statistics
    expected = 2 * len(located) if name == "keras3_export" else len(located)
    assert len(changed) == expected
    names = variable_names(source)
    assert all(names[k].endswith(("/moving_mean", "/moving_variance")) for k in changed), changed
    assert tree_digest(source) == digest  # the input is never touched


class TwoInputBN(tf.Module):
    """BN on the sum of two inputs: no single input is the calibration data's."""

    def __init__(self):
        super().__init__()
        self.mean, self.var = tf.Variable(tf.zeros([3])), tf.Variable(tf.ones([3]))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)] * 2)
    def __call__(self, a, b):
        ones, zeros = tf.ones([3]), tf.zeros([3])
        return {"out": tf.compat.v1.nn.fused_batch_norm(a + b, ones, zeros, self.mean, self.var,
                                                        is_training=False)[0]}


def test_signature_and_input_choice(tmp_path):
    tf1 = FIXTURES / "tf1_slim"
    # two inputs, BN layers fed by one of them: that one is the calibration data's, --input or not
    assert bnrepair.load(tf1).signature.input_name == "images"
    result = CliRunner().invoke(app, ["inspect", str(tf1), "--json", str(tmp_path / "i.json")])
    assert result.exit_code == 1, result.output  # problems found: the fixture's statistics were never updated
    assert len(json.loads((tmp_path / "i.json").read_text())["layers"]) == 4
    module = TwoInputBN()
    tf.saved_model.save(module, str(tmp_path / "two"), signatures=module.__call__)
    with pytest.raises(InputError, match=r"takes 2 inputs \(a, b\) and its BN layers depend on a, b; name the one "
                                         r"the calibration data feeds with --input"):
        bnrepair.load(tmp_path / "two")
    with pytest.raises(InputError, match=r"no signature 'predict'; the SavedModel has: serving_default, train_mode"):
        bnrepair.load(tf1, signature="predict", input_name="images")
    with pytest.raises(InputError, match="is_training=True"):
        bnrepair.load(tf1, signature="train_mode")
    serve = bnrepair.load(FIXTURES / "keras3_export", signature="serve")
    assert [bn.id for bn in serve.graph.bn_layers] == ["bn1", "bn2", "fc_bn"]
    result = CliRunner().invoke(app, ["recalibrate", str(tf1), "--data", str(CALIB), "--signature", "serving_default",
                                      "--input", "images", "-o", str(tmp_path / "out"), "-b", "7", "--samples",
                                      "50", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "saved_model.pb").read_bytes() == (tf1 / "saved_model.pb").read_bytes()


def test_output_written_atomically_beside_the_input(tmp_path):
    tf1, options = FIXTURES / "tf1_slim", {"input_name": "images", "samples": 20}
    (tmp_path / "taken").write_text("not a model")
    with pytest.raises(BnrepairError, match="exists and is not a SavedModel"):
        bnrepair.recalibrate(tf1, CALIB, output=tmp_path / "taken", **options)
    assert (tmp_path / "taken").read_text() == "not a model"
    bnrepair.recalibrate(tf1, CALIB, output=tmp_path / "out", seed=1, **options)
    first = checkpoint(tmp_path / "out")
    bnrepair.recalibrate(tf1, CALIB, output=tmp_path / "out", seed=2, **options)  # replaces the earlier output
    second = checkpoint(tmp_path / "out")
    assert not same(first["conv1/BatchNorm/moving_mean"], second["conv1/BatchNorm/moving_mean"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "taken"]  # no temporary folder left


class ConstantBN(tf.Module):
    """A frozen-graph style model: FusedBatchNormV3 with its statistics baked in as constants."""

    def __init__(self, with_bn: bool):
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, 4], seed=[0, 1]))
        self.with_bn = with_bn

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    def __call__(self, x):
        y = tf.nn.conv2d(x, self.kernel, 1, "SAME")
        if self.with_bn:
            ones, zeros = tf.ones([4]), tf.zeros([4])
            y = tf.compat.v1.nn.fused_batch_norm(y, ones, zeros, zeros, ones, is_training=False)[0]
        return {"out": tf.nn.relu(y)}


@pytest.mark.parametrize("with_bn, message", [
    (True, (r"cannot identify BatchNorm layers in signature 'serving_default': FusedBatchNormV3 \S+ takes its "
            r"mean/variance from constants")),
    (False, r"no FusedBatchNorm op and no rsqrt\(moving_variance \+ eps\) pattern among its \d+ ops \(.*Conv2D"),
])
def test_unidentifiable_bn_is_one_clear_error(tmp_path, with_bn, message):
    module = ConstantBN(with_bn)
    tf.saved_model.save(module, str(tmp_path / "model"), signatures=module.__call__)
    result = CliRunner().invoke(app, ["recalibrate", str(tmp_path / "model"), "--data", str(CALIB)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(InputError, match=message):
        bnrepair.load(tmp_path / "model")
    assert not (tmp_path / "model.recalibrated").exists()


def test_a_graph_that_reads_a_file_runs_only_with_trust_code(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(bytes(range(7, 71)))

    class Leaky(tf.Module):
        """A BN whose input carries the bytes of a local file, as an attacker's graph would make it."""

        def __init__(self):
            super().__init__()
            self.mean, self.var = tf.Variable(tf.zeros([4])), tf.Variable(tf.ones([4]))
            self.scale, self.offset = tf.Variable(tf.ones([4])), tf.Variable(tf.zeros([4]))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 4], tf.float32)])
        def __call__(self, x):
            leaked = tf.cast(tf.io.decode_raw(tf.io.read_file(str(secret)), tf.uint8), tf.float32)
            x = tf.ensure_shape(x + tf.reshape(tf.reduce_mean(leaked), []), [None, 8, 8, 4])
            return tf.compat.v1.nn.fused_batch_norm(x, self.scale, self.offset, self.mean, self.var,
                                                    is_training=False)[0]

    model = Leaky()
    saved = tmp_path / "leaky"
    tf.saved_model.save(model, str(saved), signatures=model.__call__)
    data = tmp_path / "x.npy"
    np.save(data, np.zeros((8, 8, 8, 4), np.float32))
    result = CliRunner().invoke(app, ["recalibrate", str(saved), "--data", str(data), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "the graph runs ReadFile (node" in result.output and "--trust-code" in result.output
    assert not (tmp_path / "out").exists()
    trusted = bnrepair.recalibrate(saved, data, output=tmp_path / "out", trust_code=True)
    assert len(trusted.layers) == 1 and (tmp_path / "out").is_dir()


def test_a_link_out_of_the_savedmodel_is_refused_before_anything_is_read_or_copied(tmp_path):
    import shutil

    source = tmp_path / "linked"
    shutil.copytree(FIXTURES / "tf1_slim", source)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    (source / "assets").mkdir(exist_ok=True)
    (source / "assets" / "vocab.txt").symlink_to(secret)
    (source / "assets" / "inner.txt").symlink_to(source / "saved_model.pb")  # a link within stays a link
    with pytest.raises(InputError, match=r"assets/vocab.txt is a symbolic link out of the SavedModel"):
        bnrepair.recalibrate(source, CALIB, output=tmp_path / "out", input_name="images", samples=20)
    assert not (tmp_path / "out").exists()
    (source / "assets" / "vocab.txt").unlink()
    bnrepair.recalibrate(source, CALIB, output=tmp_path / "out", input_name="images", samples=20)
    assert (tmp_path / "out" / "assets" / "inner.txt").is_symlink()


def test_a_graph_with_a_loop_is_recalibrated_in_bounded_time(tmp_path):
    """An ordinary ``model.export()`` of Conv1D -> BN -> LSTM holds a while loop (NextIteration -> Merge): the
    graph walk once never ended. Run in a child process, so that a regression fails instead of hanging."""
    import subprocess
    import sys

    keras.utils.set_random_seed(0)
    inputs = keras.Input((20, 3))
    conv = keras.layers.Conv1D(8, 3, name="conv")
    out = keras.layers.Dense(2)(keras.layers.LSTM(4)(keras.layers.BatchNormalization(name="bn")(conv(inputs))))
    keras.Model(inputs, out).export(str(tmp_path / "sm"), verbose=False)
    x = np.random.default_rng(0).normal(0, 1, (48, 20, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([sys.executable, "-m", "bnrepair", "recalibrate", str(tmp_path / "sm"), "--data",
                           str(tmp_path / "x.npy"), "-o", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    bn = bnrepair.load(tmp_path / "out").graph.bn_layers[0]
    h = conv(x).numpy().astype(np.float64).reshape(-1, 8)
    np.testing.assert_allclose(bn.mean, h.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.var, h.var(0), rtol=1e-4)


def test_an_output_folder_holding_the_input_is_refused(tmp_path):
    """`-o outer` where the input is outer/inner replaced outer, and so deleted the input, with exit 0."""
    import shutil

    inner = tmp_path / "outer" / "inner"
    shutil.copytree(FIXTURES / "tf1_slim", inner)
    with pytest.raises(BnrepairError, match="the input .*inner lies inside it"):
        bnrepair.recalibrate(inner, CALIB, output=tmp_path / "outer", input_name="images", samples=20)
    assert (inner / "saved_model.pb").is_file()
