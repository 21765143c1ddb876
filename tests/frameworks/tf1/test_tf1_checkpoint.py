"""TF1 training checkpoints (``.meta`` + ``.index/.data``): each fixture recalibrated through the CLI and judged
the TF1 way (``import_meta_graph`` + ``Saver.restore`` in a ``tf.compat.v1.Session``, the training flag fed
False), every variable of the output compared with the input's, and the first layer's new statistics against
the moments of its input computed in that session."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bnrepair.cli import app
from bnrepair.frameworks.tf_runtime import import_tensorflow
from fixtures import synthetic

tf = import_tensorflow()
v1 = tf.compat.v1
tf.get_logger().setLevel("ERROR")

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "tf1"
CALIB = synthetic.folder("a", "calib")
BATCH = 32
# fixture -> (extra CLI flags, the tensor normalised by the first BN layer, that layer's moving mean, the
# training-mode logits, the BN statistics the inference graph reads)
CASES = {
    "stale_ema": ([], "conv1/Conv2D:0", "bn1/moving_mean", "logits/BiasAdd:0", r"^(bn1|bn2|fc_bn)/moving_"),
    "never_updated": ([], "conv1/Conv2D:0", "bn1/moving_mean", "logits/BiasAdd:0", r"^(bn1|bn2|fc_bn)/moving_"),
    "slim": ([], "conv1/Conv/Conv2D:0", "conv1/BatchNorm/moving_mean", "logits/Dense/BiasAdd:0",
             r"^(conv1|conv2|fc)/BatchNorm/moving_"),
    "slim_train_graph": ([], "conv1/Conv/Conv2D:0", "conv1/BatchNorm/moving_mean", "logits/Dense/BiasAdd:0",
                         r"^(conv1|conv2|fc)/BatchNorm/moving_"),
    "missing_reuse": (["--feed", "keep_prob=1"], "model_1/conv1/Conv2D:0", "model_1/conv1/bn/moving_mean",
                      "model/add:0", r"^model_1/(conv1|conv2|fc)/bn/moving_"),
}


EVAL_META = {"slim_train_graph": "eval.meta"}
"""fixtures whose .meta holds the training graph only: inference is judged in the evaluation graph saved beside"""


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


class Restored:
    """A checkpoint restored as a TF1 script restores it: its own .meta graph, its variables, a session."""

    def __init__(self, prefix: Path, meta: Path | None = None):
        self.graph = tf.Graph()
        with self.graph.as_default():
            saver = v1.train.import_meta_graph(str(meta or f"{prefix}.meta"))
            self.session = v1.Session(graph=self.graph)
            saver.restore(self.session, str(prefix))
        names = {op.name for op in self.graph.get_operations()}
        self.flags = {f"{n}:0": v for n, v in (("is_training", False), ("keep_prob", 1.0)) if n in names}

    def __call__(self, fetch: str, x: np.ndarray, **flags) -> np.ndarray:
        feed = {**self.flags, **{f"{k}:0": v for k, v in flags.items() if f"{k}:0" in self.flags}, "images:0": x}
        return self.session.run(fetch, feed)

    def close(self):
        self.session.close()


def accuracy(predict, x, y) -> float:
    """Over batches of the training size in a fixed shuffled order (batch statistics need mixed classes)."""
    order = np.random.default_rng(0).permutation(len(x))
    hits = sum(int(np.sum(predict(x[order[i:i + BATCH]]).argmax(-1) == y[order[i:i + BATCH]]))
               for i in range(0, len(x), BATCH))
    return hits / len(x)


@pytest.fixture(scope="module")
def heldout():
    images, labels = synthetic.load_split("a", "heldout")
    return images.astype(np.float32) / 255.0, labels


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """Each fixture copied and recalibrated once (train mode) by the CLI: name -> (input prefix, output prefix)."""
    done = {}

    def get(name):
        if name not in done:
            folder = tmp_path_factory.mktemp(name) / name
            folder.mkdir()
            for f in (FIXTURES / name).iterdir():
                (folder / f.name).write_bytes(f.read_bytes())
            result = run("recalibrate", folder, "--data", CALIB, *CASES[name][0])
            assert result.exit_code == 0, result.output
            done[name] = folder / "model.ckpt-64", folder / "model.recalibrated.ckpt-64"
        return done[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_inference_accuracy_repaired_to_training_mode(name, repaired, heldout):
    source, output = repaired(name)
    x, y = heldout
    meta = source.parent / EVAL_META[name] if name in EVAL_META else None
    trained, before, after = Restored(source), Restored(source, meta), Restored(output, meta)
    train_logits = CASES[name][3]
    training_mode = accuracy(lambda b: trained(train_logits, b, is_training=True), x, y)
    broken = accuracy(lambda b: before("probabilities:0", b), x, y)
    fixed = accuracy(lambda b: after("probabilities:0", b), x, y)
    trained.close(), before.close(), after.close()
    assert training_mode > 0.9
    assert broken < training_mode - 0.2, (broken, training_mode)
    assert fixed >= training_mode - 0.02, (fixed, training_mode)


@pytest.mark.parametrize("name", list(CASES))
def test_only_the_statistics_inference_reads_change(name, repaired):
    import re

    source, output = repaired(name)
    old, new = tf.train.load_checkpoint(str(source)), tf.train.load_checkpoint(str(output))
    keys = old.get_variable_to_dtype_map()
    assert new.get_variable_to_dtype_map() == keys  # optimizer slots, global_step, everything kept
    changed = {k for k in keys if old.get_tensor(k).tobytes() != new.get_tensor(k).tobytes()}
    expected = {k for k in keys if re.search(CASES[name][4], k) and not re.search(r"/Adam(_1)?$", k)}
    assert changed == expected
    assert (output.parent / "model.recalibrated.ckpt-64.meta").read_bytes() == (
        source.parent / "model.ckpt-64.meta").read_bytes()


@pytest.mark.parametrize("name", ["stale_ema", "slim", "slim_train_graph", "missing_reuse"])
def test_first_layer_statistics_are_the_moments_of_its_input(name, repaired):
    """The first BN's input does not depend on any BN: its statistics are the calibration set's moments there."""
    source, output = repaired(name)
    images, _ = synthetic.load_split("a", "calib")
    restored = Restored(source)
    features = restored(CASES[name][1], images.astype(np.float32) / 255.0).astype(np.float64)
    restored.close()
    stored = tf.train.load_checkpoint(str(output))
    mean_key = CASES[name][2]
    var_key = mean_key.replace("moving_mean", "moving_variance")
    np.testing.assert_allclose(stored.get_tensor(mean_key), features.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stored.get_tensor(var_key), features.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name, cause", [("stale_ema", "stale"), ("never_updated", "never_updated"),
                                         ("slim", "stale"), ("slim_train_graph", "stale"),
                                         ("missing_reuse", "separate_variables")])
def test_diagnose_names_the_cause(name, cause, tmp_path):
    result = run("diagnose", FIXTURES / name, "--data", CALIB, "--json", tmp_path / "d.json", *CASES[name][0])
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["verdicts"][0]["cause"] == cause


def test_inspect_reports_the_missing_reuse_layers(tmp_path):
    result = run("inspect", FIXTURES / "missing_reuse", "--feed", "keep_prob=1", "--json", tmp_path / "i.json")
    assert result.exit_code == 1, result.output
    flags = json.loads((tmp_path / "i.json").read_text())["flags"]
    separate = {f["layer"] for f in flags if f["code"] == "separate_inference_variables"}
    assert separate == {"model_1/conv1/bn", "model_1/conv2/bn", "model_1/fc/bn"}
    assert not any(f["code"] == "never_updated" for f in flags)


@pytest.mark.parametrize("name, decay", [("stale_ema", 0.999), ("never_updated", 0.99), ("slim", 0.999),
                                         ("slim_train_graph", 0.999)])
def test_inspect_reads_the_decay_from_the_update_ops(name, decay, tmp_path):
    run("inspect", FIXTURES / name, "--json", tmp_path / "i.json")
    report = json.loads((tmp_path / "i.json").read_text())
    assert [layer["decay"] for layer in report["layers"]] == pytest.approx([decay] * 3)
    slow = {f["layer"] for f in report["flags"] if f["code"] == "slow_momentum"}
    assert slow == ({layer["id"] for layer in report["layers"]} if decay >= 0.999 else set())


def test_export_after_recalibration_runs_in_onnxruntime(tmp_path, heldout):
    import onnxruntime

    folder = copy_of("slim", tmp_path / "slim")
    result = run("recalibrate", folder, "--data", CALIB, "--export", tmp_path / "slim.onnx")
    assert result.exit_code == 0, result.output
    session = onnxruntime.InferenceSession(str(tmp_path / "slim.onnx"), providers=["CPUExecutionProvider"])
    x, y = heldout
    scores = session.run(None, {session.get_inputs()[0].name: x})[0]
    restored = Restored(folder / "model.recalibrated.ckpt-64")
    np.testing.assert_allclose(scores, restored("probabilities:0", x), atol=1e-5)
    restored.close()
    assert np.mean(scores.argmax(-1) == y) > 0.9


def test_eval_mode_repairs_too(tmp_path, heldout):
    folder = tmp_path / "never_updated"
    folder.mkdir()
    for f in (FIXTURES / "never_updated").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    result = run("recalibrate", folder, "--data", CALIB, "--mode", "eval", "-o", tmp_path / "fixed.ckpt-64")
    assert result.exit_code == 0, result.output
    x, y = heldout
    restored = Restored(tmp_path / "fixed.ckpt-64")
    assert accuracy(lambda b: restored("probabilities:0", b), x, y) > 0.9
    restored.close()
    # a folder of its own gets a checkpoint file naming the output, as tf.train.latest_checkpoint reads it
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "fixed.ckpt-64")


def test_a_step_failing_after_the_write_leaves_the_folder_as_it_was(tmp_path):
    """The checkpoint written, a later step (its digest, an export) fails: its files go, and so does the
    ``checkpoint`` state file the writer added to a folder that had none; a folder's own state file stays."""
    from bnrepair.frameworks.tf1.files import write_patched
    from bnrepair.writers import removed_on_failure

    source = FIXTURES / "never_updated" / "model.ckpt-64"
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "checkpoint").write_text('model_checkpoint_path: "other.ckpt-1"\n')
    for folder in (tmp_path / "new", kept):
        folder.mkdir(exist_ok=True)
        before = tree(folder)
        with pytest.raises(KeyboardInterrupt), removed_on_failure(folder / "fixed.ckpt-64"):
            write_patched(source, folder / "fixed.ckpt-64", {})
            named = tf.train.latest_checkpoint(str(folder))
            assert named == (None if folder == kept else str(folder / "fixed.ckpt-64"))
            raise KeyboardInterrupt
        assert tree(folder) == before


def tree(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_step_picks_a_checkpoint_and_the_input_files_never_change(tmp_path):
    folder = tmp_path / "stale_ema"
    folder.mkdir()
    for f in (FIXTURES / "stale_ema").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    before = tree(folder)
    result = run("recalibrate", folder, "--data", CALIB, "--step", "33")
    assert result.exit_code == 0, result.output
    after = tree(folder)
    assert {k: after[k] for k in before} == before  # the checkpoint file too: it is the input's
    assert sorted(set(after) - set(before)) == [f"model.recalibrated.ckpt-33.{s}"
                                                for s in ("data-00000-of-00001", "index", "meta")]
    missing = run("recalibrate", folder, "--data", CALIB, "--step", "5")
    assert missing.exit_code == 2 and "no checkpoint of step 5" in missing.output and "33, 64" in missing.output


def copy_of(name: str, folder: Path) -> Path:
    folder.mkdir()
    for f in (FIXTURES / name).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.mark.parametrize("damage, message", [
    ("no_meta", "no model.ckpt-64.meta beside the checkpoint"),
    ("other_meta", "does not save the checkpoint's variables"),
    ("damaged_meta", "model.ckpt-64.meta: cannot be read as a TensorFlow meta graph"),
    ("no_feed", "placeholder(s) keep_prob; give their inference values with --feed NAME=VALUE"),
    ("bad_feed", "--feed 'keep_prob': expected NAME=VALUE"),
    ("unknown_feed", "--feed dropout: no such placeholder"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(damage, message, tmp_path):
    name = "stale_ema" if damage.endswith("meta") else "missing_reuse"
    folder = copy_of(name, tmp_path / name)
    flags = []
    if damage == "no_meta":
        (folder / "model.ckpt-64.meta").unlink()
    elif damage == "damaged_meta":
        (folder / "model.ckpt-64.meta").write_bytes(b"\x0a\xffnot a meta graph")
    elif damage == "other_meta":
        (folder / "model.ckpt-64.meta").write_bytes((FIXTURES / "missing_reuse" / "model.ckpt-64.meta").read_bytes())
    else:
        flags = {"no_feed": [], "bad_feed": ["--feed", "keep_prob"], "unknown_feed": ["--feed", "dropout=1"]}[damage]
    before = tree(folder)
    result = run("recalibrate", folder / "model.ckpt-64", "--data", CALIB, *flags)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert tree(folder) == before


def two_input_graph(folder: Path, flags: int = 0, mode: bool = False, bn: bool = True) -> Path:
    """A small TF1 graph saved by a Saver: two image placeholders into one fused BN (``flags``: that many bool
    placeholders, each steering a tf.cond around the BN; ``mode``: a string placeholder steering one; ``bn``:
    False for no BN at all)."""
    graph = tf.Graph()
    with graph.as_default():
        a = v1.placeholder(tf.float32, [None, 8, 8, 3], name="a")
        b = v1.placeholder(tf.float32, [None, 8, 8, 3], name="b")
        x = tf.reshape(a + b, [-1, 8, 8, 3])
        gamma = v1.get_variable("bn/gamma", [3], initializer=v1.ones_initializer(), use_resource=False)
        beta = v1.get_variable("bn/beta", [3], initializer=v1.zeros_initializer(), use_resource=False)
        mean = v1.get_variable("bn/moving_mean", [3], initializer=v1.zeros_initializer(), use_resource=False)
        var = v1.get_variable("bn/moving_variance", [3], initializer=v1.ones_initializer(), use_resource=False)

        def batch_norm(training):
            return v1.nn.fused_batch_norm(x, gamma, beta, None if training else mean, None if training else var,
                                          is_training=training)[0]

        y = batch_norm(False) if bn else x * gamma
        for i in range(flags):
            y = v1.cond(v1.placeholder(tf.bool, [], name=f"flag{i}"), lambda: batch_norm(True), lambda: y)
        if mode:
            y = v1.cond(tf.equal(v1.placeholder(tf.string, [], name="mode"), "train"), lambda: batch_norm(True),
                        lambda: y)
        tf.identity(tf.reduce_mean(y, [1, 2]), name="out")
        saver = v1.train.Saver()
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            folder.mkdir()
            return Path(saver.save(session, str(folder / "model.ckpt"), global_step=1))


def test_an_ambiguous_input_needs_input(tmp_path):
    prefix = two_input_graph(tmp_path / "m")
    result = run("inspect", prefix)
    assert result.exit_code == 2 and "the BN layers depend on placeholders a, b; name the one" in result.output
    # with --input, the other image placeholder is an input it cannot feed
    named = run("inspect", prefix, "--input", "a")
    assert named.exit_code == 2
    assert "depend on placeholder(s) b besides a; give their values with --feed" in named.output


def test_several_training_flags_ask_which(tmp_path):
    prefix = two_input_graph(tmp_path / "m", flags=2)
    result = run("inspect", prefix, "--feed", "b=0")
    assert result.exit_code == 2 and "several bool placeholders steer tf.cond (flag0, flag1)" in result.output
    fed = run("inspect", prefix, "--feed", "b=0", "--feed", "flag0=false", "--feed", "flag1=false")
    assert fed.exit_code in (0, 1), fed.output


def test_a_cond_on_another_placeholder_asks_for_feed(tmp_path):
    prefix = two_input_graph(tmp_path / "m", mode=True)
    result = run("inspect", prefix, "--feed", "b=0")
    assert result.exit_code == 2 and "mode" in result.output and "--feed NAME=VALUE" in result.output
    fed = run("inspect", prefix, "--feed", "b=0", "--feed", "mode=eval")
    assert fed.exit_code in (0, 1), fed.output


def test_a_graph_without_bn_is_one_clear_error(tmp_path):
    prefix = two_input_graph(tmp_path / "m", bn=False)
    result = run("inspect", prefix, "--feed", "b=0")
    assert result.exit_code == 2 and "cannot identify BatchNorm layers" in result.output


def test_export_takes_the_graph_options(tmp_path):
    needs = run("export", FIXTURES / "missing_reuse", "-o", tmp_path / "n.onnx", "--data", CALIB)
    assert needs.exit_code == 2 and "keep_prob" in needs.output and not (tmp_path / "n.onnx").exists()
    done = run("export", FIXTURES / "missing_reuse", "-o", tmp_path / "m.onnx", "--feed", "keep_prob=1",
               "--data", CALIB)
    assert done.exit_code == 0, done.output
    assert (tmp_path / "m.onnx").is_file()


def test_resolving_a_cond_keeps_the_control_inputs_on_it():
    """A control input on a Switch or Merge that resolving removes now waits on the node the data comes from: the
    resolved graph imports and computes the inference branch."""
    from tensorflow.core.framework import graph_pb2

    from bnrepair.frameworks.tf1.conditionals import resolve

    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None], name="x")
        pred = tf.constant(False, name="pred")
        off, on = tf.raw_ops.Switch(data=x, pred=pred, name="switch")
        merged = tf.raw_ops.Merge(inputs=[off + 1.0, on * 2.0], name="merge")[0]
        with tf.control_dependencies([merged.op, graph.get_operation_by_name("switch")]):
            tf.identity(merged, name="out")
    resolved = resolve(graph.as_graph_def())
    names = {n.name for n in resolved.node}
    assert not {"switch", "merge"} & names
    out = next(n for n in resolved.node if n.name == "out")
    assert all(i.lstrip("^") in names for i in out.input), list(out.input)
    fresh = tf.Graph()
    with fresh.as_default():
        tf.graph_util.import_graph_def(graph_pb2.GraphDef.FromString(resolved.SerializeToString()), name="")
        with v1.Session(graph=fresh) as session:
            np.testing.assert_array_equal(session.run("out:0", {"x:0": [1.0, 2.0]}), [2.0, 3.0])
