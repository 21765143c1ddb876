"""ONNX models as input: torch's own exporter writes them from the fixture architecture (random weights,
statistics broken on purpose); recalibrated in onnxruntime and checked against torch computing the same
statistics independently in float64."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

import bnrepair
from bnrepair.cli import app
from bnrepair.errors import InputError
from fixtures import CALIB, needs
from fixtures.torch.arch import build


def broken_model(seed=0):
    torch.manual_seed(seed)
    model = build().eval()
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.as_tensor(rng.normal(0, 1, m.num_features)))
                m.running_var.copy_(torch.as_tensor(rng.uniform(0.2, 3, m.num_features)))
                m.weight.copy_(torch.as_tensor(rng.uniform(0.5, 1.5, m.num_features)))
    return model


def exported(model, path, opset=17, **kwargs):
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["logits"], do_constant_folding=False,
                      dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}}, **kwargs)
    return path


def stored(path) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def bn_inputs(model, batches, train: bool):
    """Each BN module's input over ``batches``, pooled in float64: torch itself, independently of bnrepair."""
    model = model.double().train(train)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(
        a[0].detach().transpose(0, 1).reshape(a[0].shape[1], -1))) for name, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for x in batches:
            model(torch.as_tensor(x, dtype=torch.float64))
    for h in hooks:
        h.remove()
    return {name: (torch.cat(v, 1).mean(1).numpy(), torch.cat(v, 1).var(1, unbiased=False).numpy())
            for name, v in seen.items()}


@pytest.mark.parametrize("opset", [13, 18])
def test_train_mode_matches_torch_batch_statistics(tmp_path, opset):
    model = broken_model()
    path = exported(model, tmp_path / "m.onnx", opset=opset)
    batches = [np.random.default_rng(i).normal(0.3, 1.2, (16, 3, 32, 32)).astype(np.float32) for i in range(3)]
    report = bnrepair.recalibrate(path, batches, output=tmp_path / "r.onnx")
    assert len(report.layers) == 3
    want = bn_inputs(broken_model(), batches, train=True)
    got = stored(tmp_path / "r.onnx")
    for name, (mean, var) in want.items():
        std = np.sqrt(var + 1e-5)
        assert np.max(np.abs(got[f"{name}.running_mean"] - mean) / std) < 1e-4
        np.testing.assert_allclose(got[f"{name}.running_var"], var, rtol=1e-4)


@pytest.mark.parametrize("static", [False, True])
def test_eval_mode_reaches_the_inference_fixed_point(tmp_path, static):
    """The written statistics are what their own inference feeds each BN (torch in eval mode, float64). A graph
    whose batch is static (16) runs every pass at the batches given, none joined."""
    path = tmp_path / "m.onnx"
    if static:
        torch.onnx.export(broken_model(), (torch.zeros(16, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], do_constant_folding=False)
    else:
        exported(broken_model(), path)
    batches = [np.random.default_rng(i).normal(0.3, 1.2, (16, 3, 32, 32)).astype(np.float32) for i in range(3)]
    report = bnrepair.recalibrate(path, batches, output=tmp_path / "r.onnx", mode="eval")
    assert report.converged and report.eval_batch == (None if static else 48)
    got = stored(tmp_path / "r.onnx")
    model = broken_model()
    model.load_state_dict({**model.state_dict(), **{k: torch.as_tensor(v) for k, v in got.items()
                                                    if k.endswith(("running_mean", "running_var"))}})
    for name, (mean, var) in bn_inputs(model, batches, train=False).items():
        std = np.sqrt(var + 1e-5)
        assert np.max(np.abs(got[f"{name}.running_mean"] - mean) / std) < 1e-4
        np.testing.assert_allclose(got[f"{name}.running_var"], var, rtol=2e-4)


@pytest.mark.parametrize("opset", [13, 18])
def test_a_drift_corrected_batch_is_measured_as_torch_measures_it(tmp_path, opset):
    """Eval mode's corrected passes: each BN normalises with the batch's moments carried by its correction
    (``drift.corrected``, fed as graph inputs); every layer's moments equal the torch module's under the same
    corrections, and downstream ones differ from a plain pass's."""
    onnx_runner = bnrepair.load(exported(broken_model(), tmp_path / "m.onnx", opset=opset))
    torch_runner = bnrepair.load(broken_model())
    ids = [bn.id for bn in onnx_runner.graph.bn_layers]
    names = [bn.id for bn in torch_runner.graph.bn_layers]  # features.1 for /features/features.1/BatchNormalization
    x = np.random.default_rng(0).normal(0.3, 1.2, (16, 3, 32, 32)).astype(np.float32)
    plain = onnx_runner.collect(x, "eval", ids)
    rng = np.random.default_rng(1)
    corrections = [(rng.normal(0, 0.5, m.mean.shape) * np.sqrt(m.variance(False)), m.variance(False) + 1e-3,
                    m.variance(False) * rng.uniform(0.5, 2, m.mean.shape) + 1e-3) for m in plain.values()]
    got = onnx_runner.collect(x, "eval", ids, frozenset(ids), dict(zip(ids, corrections)))
    want = torch_runner.collect(torch.as_tensor(x), "eval", names, frozenset(names), dict(zip(names, corrections)))
    for i, name in zip(ids, names):
        std = np.sqrt(want[name].variance(False))
        assert np.max(np.abs(got[i].mean - want[name].mean) / std) < 1e-5
        np.testing.assert_allclose(got[i].variance(False), want[name].variance(False), rtol=1e-5)
    assert min(np.max(np.abs(got[i].mean - plain[i].mean)) for i in ids[1:]) > 0.1


def test_a_never_updated_model_from_the_legacy_exporter_is_repaired_as_its_checkpoint_is(tmp_path):
    """The never-updated fixture (mean 0 = bias, variance 1 = weight) exported by torch's legacy exporter: it
    stores each value once and feeds the statistics through Identity copies, so the statistics get initializers
    of their own; recalibrated as ONNX, the model reaches the accuracy its recalibrated checkpoint reaches, and
    the bias and weight it shared them with keep their values."""
    from fixtures import ARCH_FLAGS, make_torch

    checkpoint = make_torch.OUT / "never_updated.pt"
    module = bnrepair.load(checkpoint, arch=ARCH_FLAGS[1]).module.eval()
    path = exported(module, tmp_path / "never.onnx")
    assert "Identity" in [n.op_type for n in onnx.load(str(path)).graph.node]
    cli = CliRunner()
    for source, flags, out in ((checkpoint, ARCH_FLAGS, tmp_path / "fixed.pt"), (path, [], tmp_path / "fixed.onnx")):
        done = cli.invoke(app, ["recalibrate", str(source), *flags, "-d", str(CALIB), "-o", str(out), "-q"])
        assert done.exit_code == 0, done.output
    accuracy = {name: heldout_accuracy(bnrepair.load(p, **kw)) for name, p, kw in (
        ("broken", path, {}), ("onnx", tmp_path / "fixed.onnx", {}),
        ("checkpoint", tmp_path / "fixed.pt", {"arch": ARCH_FLAGS[1]}))}
    assert abs(accuracy["onnx"] - accuracy["checkpoint"]) <= 0.01, accuracy
    assert accuracy["onnx"] > accuracy["broken"] + 0.2, accuracy
    before, after = stored(path), stored(tmp_path / "fixed.onnx")
    assert set(before) <= set(after)  # the statistics the copies shared stay where they were
    statistics = {n for n in before if "running_" in n}
    assert all(np.array_equal(before[n], after[n]) for n in set(before) - statistics)  # bias, weight untouched


def test_statistics_and_weights_held_in_constant_nodes_are_values(tmp_path):
    """Conv -> BN with the conv's weight, the BN's scale, bias, mean and variance in Constant nodes (as
    paddle2onnx writes them) and the mean through a Cast: inspected, recalibrated (only the statistics' values
    change, now as initializers of the BN's own) and folded, against numpy."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.normal(0, 0.5, 4).astype(np.float32)
    mean, var = np.full(4, 7.0, np.float64), np.full(4, 9.0, np.float32)

    def constant(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_value"))

    nodes = [constant("w", w), constant("gamma", gamma), constant("beta", beta), constant("mean64", mean),
             helper.make_node("Cast", ["mean64"], ["mean"], to=TensorProto.FLOAT), constant("var", var),
             helper.make_node("Conv", ["input", "w"], ["conv"]),
             helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["out"], name="bn")]
    graph = helper.make_graph(nodes, "paddle_like", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                   ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4, 6, 6])])
    path = tmp_path / "constants.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    x = rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cli = CliRunner()
    assert cli.invoke(app, ["inspect", str(path), "-q"]).exit_code in (0, 1)
    done = cli.invoke(app, ["recalibrate", str(path), "-d", str(tmp_path / "x.npy"), "-o", str(tmp_path / "r.onnx"),
                            "-q"])
    assert done.exit_code == 0, done.output
    conv = torch.nn.functional.conv2d(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(w, dtype=torch.float64))
    want_mean, want_var = conv.mean((0, 2, 3)).numpy(), conv.var((0, 2, 3), unbiased=False).numpy()  # as ONNX
    fixed = onnx.load(str(tmp_path / "r.onnx"))
    bn = next(n for n in fixed.graph.node if n.op_type == "BatchNormalization")
    values = {i.name: numpy_helper.to_array(i) for i in fixed.graph.initializer}
    assert set(values) == {bn.input[3], bn.input[4]}  # the statistics, now the BN's own; the rest as it was
    np.testing.assert_allclose(values[bn.input[3]], want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values[bn.input[4]], want_var, rtol=1e-4)
    assert [n.op_type for n in fixed.graph.node].count("Constant") == 3  # w, gamma, beta: untouched
    folded = cli.invoke(app, ["fold", str(path), "-d", str(tmp_path / "x.npy"), "-o", str(tmp_path / "f.onnx"),
                              "--json", str(tmp_path / "f.json"), "-q"])
    assert folded.exit_code == 0, folded.output
    assert len(json.loads((tmp_path / "f.json").read_text())["folded"]) == 1
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node]


def test_a_linear_without_bias_exported_without_constant_folding_folds(tmp_path):
    """Linear(bias=False) -> BatchNorm1d from the legacy exporter with constant folding off: the weight reaches
    the MatMul as Transpose(initializer), a value all the same."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.BatchNorm1d(5)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    path = tmp_path / "linear.onnx"
    torch.onnx.export(model, (torch.zeros(2, 6),), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      do_constant_folding=False, dynamic_axes={"input": {0: "b"}})
    assert "Transpose" in [n.op_type for n in onnx.load(str(path)).graph.node]
    x = np.random.default_rng(0).normal(0, 1, (32, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    done = CliRunner().invoke(app, ["fold", str(path), "-d", str(tmp_path / "x.npy"), "-o", str(tmp_path / "f.onnx"),
                                    "-q"])
    assert done.exit_code == 0, done.output
    folded = onnx.load(str(tmp_path / "f.onnx"))
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    got = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    with torch.no_grad():
        want = model.double()(torch.as_tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


def test_only_the_statistics_change_and_the_cli_reports(tmp_path):
    path = exported(broken_model(), tmp_path / "m.onnx")
    done = CliRunner().invoke(app, ["recalibrate", str(path), "-d", str(CALIB), "--json", str(tmp_path / "r.json"),
                                    "-q"])
    assert done.exit_code == 0, done.output
    out = tmp_path / "m.recalibrated.onnx"
    before, after = onnx.load(str(path)), onnx.load(str(out))
    assert before.graph.node == after.graph.node and before.opset_import == after.opset_import
    assert before.graph.input == after.graph.input and before.graph.output == after.graph.output
    old, new = stored(path), stored(out)
    changed = sorted(k for k in old if not np.array_equal(old[k], new[k]))
    assert changed == sorted(k for k in old if k.endswith(("running_mean", "running_var")))
    assert all(new[k].dtype == old[k].dtype for k in old)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["framework"] == "onnx" and report["samples"] == 256
    inspected = CliRunner().invoke(app, ["inspect", str(out)])
    assert inspected.exit_code == 0 and "features.5" in inspected.output


def test_a_model_in_memory_takes_the_new_statistics(tmp_path):
    proto = onnx.load(str(exported(broken_model(), tmp_path / "m.onnx")))
    batches = [np.random.default_rng(i).normal(0, 1, (8, 3, 32, 32)).astype(np.float32) for i in range(2)]
    bnrepair.recalibrate(proto, batches)
    bnrepair.recalibrate(tmp_path / "m.onnx", batches, output=tmp_path / "r.onnx")
    assert {i.name: numpy_helper.to_array(i).tobytes() for i in proto.graph.initializer} == \
        {k: v.tobytes() for k, v in stored(tmp_path / "r.onnx").items()}


def test_external_data_is_read_from_beside_the_model_only(tmp_path):
    model = onnx.load(str(exported(broken_model(), tmp_path / "m.onnx")))
    onnx.save_model(model, str(tmp_path / "big.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.weights", size_threshold=0)
    batches = [np.random.default_rng(0).normal(0, 1, (8, 3, 32, 32)).astype(np.float32)] * 2
    bnrepair.recalibrate(tmp_path / "big.onnx", batches, output=tmp_path / "fixed.onnx")
    assert (tmp_path / "fixed.onnx.data").is_file()
    bnrepair.recalibrate(tmp_path / "m.onnx", batches, output=tmp_path / "plain.onnx")
    reference = stored(tmp_path / "plain.onnx")
    loaded = onnx.load(str(tmp_path / "fixed.onnx"))  # its external data from beside it
    assert {i.name: numpy_helper.to_array(i).tobytes() for i in loaded.graph.initializer} == \
        {k: v.tobytes() for k, v in reference.items()}
    for init in model.graph.initializer:  # an attacker's location, outside the folder
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        init.external_data.add(key="location", value="../../etc/passwd")
        init.ClearField("raw_data")
        break
    (tmp_path / "evil").mkdir()
    with open(tmp_path / "evil" / "evil.onnx", "wb") as f:
        f.write(model.SerializeToString())
    with pytest.raises(InputError, match=r"keeps its data at '../../etc/passwd', outside the model's folder"):
        bnrepair.inspect(tmp_path / "evil" / "evil.onnx")


class Mixed(torch.nn.Module):
    """Every producer an ONNX BN folds into (Conv, grouped ConvTranspose, Gemm), and one it cannot (after a ReLU)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.up, self.bn2 = torch.nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), torch.nn.BatchNorm2d(6)
        self.bn3 = torch.nn.BatchNorm2d(6)
        self.fc, self.bn4 = torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.bn3(torch.relu(self.bn2(self.up(torch.relu(self.bn1(self.conv(x)))))))
        return self.bn4(self.fc(x.mean((2, 3))))


def with_statistics(model, rng):
    """``model`` with every BN's statistics and affine parameters random, as a trained net's are."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.as_tensor(rng.normal(0, 1, m.num_features)))
                m.running_var.copy_(torch.as_tensor(rng.uniform(0.2, 3, m.num_features)))
                m.weight.copy_(torch.as_tensor(rng.uniform(0.5, 1.5, m.num_features)))
                m.bias.copy_(torch.as_tensor(rng.normal(0, 0.5, m.num_features)))
    return model


def test_fold_merges_each_bn_into_its_producer_and_names_the_rest(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = with_statistics(Mixed().eval(), rng)
    path = exported(model, tmp_path / "mixed.onnx")
    x = rng.normal(0, 1, (8, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    done = CliRunner().invoke(app, ["fold", str(path), "-d", str(tmp_path / "x.npy"), "--json",
                                    str(tmp_path / "f.json"), "-q"])
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "f.json").read_text())
    assert len(report["folded"]) == 3 and [r["reason"] for r in report["refused"]] == [
        "BN follows /Relu_1 (Relu), not a Conv, ConvTranspose, Gemm or MatMul"]
    folded = onnx.load(str(tmp_path / "mixed.folded.onnx"))
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 1
    assert any(p.key.startswith("bnrepair") for p in folded.metadata_props)
    session = ort.InferenceSession(str(tmp_path / "mixed.folded.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model(torch.as_tensor(x)).numpy()  # torch itself, not the ONNX the fold started from
    np.testing.assert_allclose(session.run(None, {"input": x})[0], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("framework", ["keras", "torch"])
def test_the_fixtures_as_onnx_get_the_statistics_their_checkpoints_get(tmp_path, framework):
    """The broken fixtures exported (unfolded) to ONNX, recalibrated as ONNX in eval mode, equal the checkpoint
    recalibrated in its own framework (Keras images stay (H, W, C), torch's are (C, H, W))."""
    pytest.importorskip("tensorflow" if framework == "keras" else "torch")
    from fixtures import ARCH_FLAGS, KERAS_STALE, TORCH_STALE

    source, flags, suffix = (KERAS_STALE, [], ".h5") if framework == "keras" else (TORCH_STALE, ARCH_FLAGS, ".pt")
    cli = CliRunner()
    assert cli.invoke(app, ["export", str(source), *flags, "-o", str(tmp_path / "m.onnx"), "--no-fold", "-q"]) \
        .exit_code == 0
    for path, extra, out in ((source, flags, tmp_path / f"fixed{suffix}"), (tmp_path / "m.onnx", [],
                                                                          tmp_path / "fixed.onnx")):
        done = cli.invoke(app, ["recalibrate", str(path), *extra, "-d", str(CALIB), "--mode", "eval", "-o",
                                str(out), "--json", str(out) + ".json", "-q"])
        assert done.exit_code == 0, done.output
    checkpoint = bnrepair.load(tmp_path / f"fixed{suffix}", **({"arch": ARCH_FLAGS[1]} if flags else {}))
    onnx_model = bnrepair.load(tmp_path / "fixed.onnx")
    assert len(onnx_model.graph.bn_layers) == len(checkpoint.graph.bn_layers) == 3
    for ours, theirs in zip(onnx_model.graph.bn_layers, checkpoint.graph.bn_layers):
        std = np.sqrt(theirs.var + theirs.eps)
        assert np.max(np.abs(ours.mean - theirs.mean) / std) < 1e-4
        np.testing.assert_allclose(ours.var, theirs.var, rtol=1e-4)  # torch's unbiased: n / (n - 1) = 1 + 4e-6
    broken = bnrepair.load(tmp_path / "m.onnx")
    accuracy = {name: heldout_accuracy(runner) for name, runner in
                (("broken", broken), ("onnx", onnx_model), ("checkpoint", checkpoint))}
    assert abs(accuracy["onnx"] - accuracy["checkpoint"]) <= 0.01, accuracy
    assert accuracy["onnx"] > accuracy["broken"] + 0.2, accuracy  # the repair is what the accuracy shows


def heldout_accuracy(runner) -> float:
    """Top-1 accuracy on the fixtures' held-out images of domain a, the model at inference."""
    from bnrepair.data import calibration, image_spec
    from bnrepair.options import DataOptions
    from fixtures import synthetic

    batches = calibration(synthetic.folder("a", "heldout"), image_spec(runner.graph), DataOptions(batch_size=64))
    hits = [np.argmax(np.asarray(runner.infer(runner.cast_input(b.inputs))), axis=1) == b.labels for b in batches]
    return float(np.mean(np.concatenate(hits)))


def test_fold_takes_the_graph_input_by_name(tmp_path):
    """``--input`` names the graph input for fold as for every other command; a wrong name is one line."""
    path = exported(with_statistics(Mixed().eval(), np.random.default_rng(1)), tmp_path / "mixed.onnx")
    name = onnx.load(str(path)).graph.input[0].name
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(0, 1, (8, 3, 32, 32)).astype(np.float32))
    common = ["fold", str(path), "-d", str(tmp_path / "x.npy"), "-q"]
    done = CliRunner().invoke(app, [*common, "--input", name, "-o", str(tmp_path / "f.onnx")])
    assert done.exit_code == 0, done.output
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(tmp_path / "f.onnx")).graph.node) == 1
    wrong = CliRunner().invoke(app, [*common, "--input", "nope", "-o", str(tmp_path / "g.onnx")])
    assert wrong.exit_code == 2 and "has no input 'nope'" in wrong.output
    assert len(wrong.output.strip().splitlines()) == 1 and not (tmp_path / "g.onnx").exists()


def test_matmul_with_and_without_a_bias_add_folds(tmp_path):
    """MatMul -> Add -> BN and MatMul -> BN (as other exporters write dense layers), checked against numpy."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1, b1, w2 = rng.normal(0, 1, (4, 5)), rng.normal(0, 1, 5), rng.normal(0, 1, (5, 3))
    bns = [(rng.uniform(0.5, 2, c), rng.normal(0, 1, c), rng.normal(0, 1, c), rng.uniform(0.5, 2, c)) for c in (5, 3)]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
             (("w1", w1), ("b1", b1), ("w2", w2), *((f"{k}{i}", a) for i, bn in enumerate(bns)
                                                     for k, a in zip(("g", "b", "m", "v"), bn)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="dense1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("BatchNormalization", ["hb", "g0", "b0", "m0", "v0"], ["y1"], name="bn1"),
             helper.make_node("MatMul", ["y1", "w2"], ["h2"], name="dense2"),
             helper.make_node("BatchNormalization", ["h2", "g1", "b1_", "m1", "v1"], ["y"], name="bn2")]
    for init in inits:
        if init.name == "b1" and init.dims == [3]:
            init.name = "b1_"
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "dense.onnx"))
    x = rng.normal(0, 1, (16, 4)).astype(np.float32)
    report = bnrepair.fold(tmp_path / "dense.onnx", tmp_path / "f.onnx", data=x)
    assert [row.bn for row in report.folded] == ["bn1", "bn2"] and not report.refused
    folded = onnx.load(str(tmp_path / "f.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)

    def bn(h, g, b, m, v):
        return (h - m) / np.sqrt(v + 1e-5) * g + b

    want = bn(bn(x.astype(np.float64) @ w1 + b1, *bns[0]) @ w2, *bns[1])
    session = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], want, atol=1e-4, rtol=1e-4)


def half(model):
    """``model`` with every float tensor (initializers, constants, inputs, outputs) in float16."""
    from onnx import TensorProto

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in out.graph.node:
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
    for value in (*out.graph.input, *out.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del out.graph.value_info[:]
    return out


def test_a_float16_model_is_measured_in_float32_and_written_in_float16(tmp_path):
    """Moments of float16 activations are taken in float32; the statistics are stored back as float16. The
    reference: the same network in float32, whose statistics the float16 ones must round to."""
    model = onnx.load(str(exported(broken_model(), tmp_path / "m.onnx")))
    onnx.save(half(model), str(tmp_path / "h.onnx"))
    batches = [np.random.default_rng(i).normal(0.3, 1.2, (16, 3, 32, 32)).astype(np.float32) for i in range(3)]
    bnrepair.recalibrate(tmp_path / "m.onnx", batches, output=tmp_path / "m.r.onnx")
    bnrepair.recalibrate(tmp_path / "h.onnx", batches, output=tmp_path / "h.r.onnx")
    full, reduced = stored(tmp_path / "m.r.onnx"), stored(tmp_path / "h.r.onnx")
    for name in (k for k in full if k.endswith(("running_mean", "running_var"))):
        assert reduced[name].dtype == np.float16
        scale = np.sqrt(full[name.replace("mean", "var")] + 1e-5)
        off = np.max(np.abs(reduced[name].astype(np.float64) - full[name]) / scale)
        assert off < 5e-3  # the weights are float16 too: 1.4e-3 measured


def test_bad_onnx_input_is_one_line(tmp_path):
    from onnx import TensorProto, helper

    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    broken = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["missing"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                            [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]), ir_version=8,
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(broken, str(tmp_path / "unchecked.onnx"))
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]), ir_version=8,
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(plain, str(tmp_path / "no_bn.onnx"))
    model = exported(broken_model(), tmp_path / "m.onnx")
    np.save(tmp_path / "gray.npy", np.zeros((8, 1, 32, 32), np.float32))
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in (
            (["inspect", tmp_path / "junk.onnx"], "junk.onnx: not a readable ONNX model"),
            (["inspect", tmp_path / "unchecked.onnx"], "unchecked.onnx: fails onnx.checker"),
            (["recalibrate", tmp_path / "no_bn.onnx", "-d", CALIB],
             "no_bn.onnx: the model has no BatchNormalization node with stored statistics"),
            (["recalibrate", model, "-d", tmp_path / "gray.npy"], "gray.npy")):
        done = CliRunner().invoke(app, [str(a) for a in args])
        assert done.exit_code == 2 and len(done.output.strip().splitlines()) == 1, done.output
        assert message in done.output, done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_bn_with_computed_statistics_is_left_alone_and_named(tmp_path):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(0, 1, (4, 3, 3, 3)), "g": np.ones(4), "b": np.zeros(4), "m": np.zeros(4),
              "v": np.ones(4), "m2": np.zeros(4), "v2": np.ones(4)}
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y1"], name="bn1"),
             helper.make_node("ReduceMean", ["y1"], ["m2_computed"], name="computed", axes=[0, 2, 3], keepdims=0),
             helper.make_node("BatchNormalization", ["y1", "g", "b", "m2_computed", "v2"], ["y"], name="bn2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "m.onnx"))
    x = rng.normal(2, 3, (16, 3, 8, 8)).astype(np.float32)
    report = bnrepair.recalibrate(tmp_path / "m.onnx", [x[:8], x[8:]], output=tmp_path / "r.onnx")
    assert [layer.id for layer in report.layers] == ["bn1"]
    after = stored(tmp_path / "r.onnx")
    assert np.array_equal(after["m2"], arrays["m2"].astype(np.float32)) and not np.allclose(after["m"], 0)
    folded = bnrepair.fold(tmp_path / "m.onnx", tmp_path / "f.onnx", data=x)
    assert [row.bn for row in folded.folded] == ["bn1"]
    assert [(r.bn, r.reason) for r in folded.refused] == [("bn2", "its mean / variance are computed in the graph, "
                                                                  "not stored")]
    flags = [(f.layer, f.code, f.message) for f in bnrepair.inspect(tmp_path / "m.onnx").flags if f.layer == "bn2"]
    assert flags == [("bn2", "left_alone", "not recalibrated: its mean / variance are computed in the graph, not "
                                           "stored")]


class Scaled(torch.nn.Module):
    """The fixture net with a second input: a temperature that divides the logits (or, ``into_bn``, is added
    to the image before the first BN, so that the BN layers depend on it)."""

    def __init__(self, into_bn: bool = False):
        super().__init__()
        self.net, self.into_bn = broken_model(), into_bn

    def forward(self, x, temperature):
        return self.net(x + temperature) if self.into_bn else self.net(x) / temperature


def two_inputs(path, into_bn=False):
    model = Scaled(into_bn).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32), torch.ones(1, 1)), str(path), dynamo=False, opset_version=17,
                      input_names=["image", "temperature"], output_names=["logits"], do_constant_folding=False,
                      dynamic_axes={"image": {0: "b"}, "temperature": {0: "b"}, "logits": {0: "b"}})
    return model, path


def test_input_names_the_graph_input_the_data_feeds_when_there_are_several(tmp_path):
    model, path = two_inputs(tmp_path / "two.onnx")
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).uniform(0, 1, (48, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "fixed.onnx"
    result = CliRunner().invoke(app, ["recalibrate", str(path), "--data", str(data), "--input", "image", "-o",
                                      str(out), "-q", "-b", "48"])  # one batch: what the reference normalises with
    assert result.exit_code == 0, result.output
    expected = bn_inputs(model.net, [np.load(data)], train=True)
    got = stored(out)
    names = [n for n, m in model.net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    mean_names = sorted(k for k in got if k.endswith("running_mean"))
    assert len(mean_names) == len(names)
    for name in names:
        np.testing.assert_allclose(got[f"net.{name}.running_mean"], expected[name][0], rtol=1e-4, atol=1e-5)
    without = CliRunner().invoke(app, ["recalibrate", str(path), "--data", str(data), "-o", str(out)])
    assert without.exit_code == 2 and "takes 2 inputs (image, temperature)" in without.output
    assert "--input" in without.output
    wrong = CliRunner().invoke(app, ["recalibrate", str(path), "--data", str(data), "--input", "nope", "-o", str(out)])
    assert wrong.exit_code == 2 and "no input 'nope' (--input); its inputs: image, temperature" in wrong.output
    _, both = two_inputs(tmp_path / "both.onnx", into_bn=True)
    needs = CliRunner().invoke(app, ["recalibrate", str(both), "--data", str(data), "--input", "image", "-o",
                                     str(tmp_path / "b.onnx")])
    assert needs.exit_code == 2 and "depend on graph input(s) temperature" in needs.output
    assert not (tmp_path / "b.onnx").exists()


def test_fold_leaves_no_orphan_initializer_and_no_onnxruntime_chatter(tmp_path):
    """A folded BN's scale and bias went with it: left behind, every onnxruntime session printed one warning per
    orphan ("Removing initializer ..."), in a process of its own where the native log reaches the terminal."""
    import subprocess
    import sys

    from fixtures import REPO

    path = exported(with_statistics(Mixed().eval(), np.random.default_rng(1)), tmp_path / "mixed.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(0, 1, (8, 3, 32, 32)).astype(np.float32))
    done = subprocess.run([sys.executable, "-m", "bnrepair", "fold", str(path), "-d", str(tmp_path / "x.npy"), "-o",
                           str(tmp_path / "f.onnx")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "onnxruntime" not in done.stderr and "Removing initializer" not in done.stderr + done.stdout
    graph = onnx.load(str(tmp_path / "f.onnx")).graph
    read = {name for node in graph.node for name in node.input}
    assert [i.name for i in graph.initializer if i.name not in read] == []


def test_inspect_needs_no_rank_of_the_bn_inputs(tmp_path):
    """The BN reads an op of another domain, which onnx's shape inference does not know (as in exporters' custom
    ops): the BN input's rank is unknown, which measuring needs and inspecting does not."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(0, 1, (4, 3, 3, 3)), "g": np.ones(4), "b": np.zeros(4), "m": np.zeros(4),
              "v": np.ones(4)}
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mystery", ["c"], ["r"], name="custom", domain="custom.test"),
             helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 6, 6])], inits)
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                    helper.make_opsetid("custom.test", 1)]),
              str(tmp_path / "m.onnx"))
    report = bnrepair.inspect(tmp_path / "m.onnx")
    assert [layer.id for layer in report.layers] == ["bn"]


# --- real exporters' graphs of a real architecture -------------------------------------------------------------
# torchvision's resnet18 (random weights and statistics) as torch's legacy exporter writes it at opsets 13 and 17,
# and its dynamo exporter (onnxscript) at opset 18, which computes each conv's zero bias from the weight's shape and
# casts it like the activation (``CastLike``): each folds completely and recalibrates as torch measures the same
# batches in float64.
EXPORTERS = ["legacy-13", "legacy-17", "dynamo-18"]


def resnet18():
    torchvision = needs("torchvision", "pip install torch==2.14.1 torchvision==0.29.1")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.as_tensor(rng.normal(0, 0.5, m.num_features)))
                m.running_var.copy_(torch.as_tensor(rng.uniform(0.5, 2, m.num_features)))
                m.weight.copy_(torch.as_tensor(rng.uniform(0.5, 1.5, m.num_features)))
                m.bias.copy_(torch.as_tensor(rng.normal(0, 0.5, m.num_features)))
    return model


def exported_by(exporter: str, path):
    """``resnet18`` as ``exporter`` writes it, BatchNormalization nodes kept (the legacy exporter in PRESERVE
    mode, the dynamo one without its optimiser, which would fold them itself)."""
    kind, opset = exporter.split("-")
    x = torch.zeros(2, 3, 32, 32)
    if kind == "legacy":
        torch.onnx.export(resnet18(), (x,), str(path), dynamo=False, opset_version=int(opset), input_names=["input"],
                          dynamic_axes={"input": {0: "b"}}, training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=opset == "17")
    else:
        needs("onnxscript", "pip install onnxscript")
        program = torch.onnx.export(resnet18(), (x,), dynamo=True, opset_version=int(opset), optimize=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(str(path))
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("BatchNormalization") == 20
    return path


@pytest.fixture(scope="module")
def resnet_inputs(tmp_path_factory):
    x = np.random.default_rng(1).normal(0, 1, (32, 3, 32, 32)).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "x.npy"
    np.save(path, x)
    return path


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_each_exporters_graph_folds_every_bn_and_matches_torch(tmp_path, resnet_inputs, exporter):
    path = exported_by(exporter, tmp_path / "m.onnx")
    done = CliRunner().invoke(app, ["fold", str(path), "-d", str(resnet_inputs), "-o", str(tmp_path / "f.onnx"), "-q"])
    assert done.exit_code == 0, done.output
    folded = onnx.load(str(tmp_path / "f.onnx"))
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    x = np.load(resnet_inputs)
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = resnet18().double()(torch.as_tensor(x, dtype=torch.float64)).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_each_exporters_graph_is_recalibrated_as_torch_measures_it(tmp_path, resnet_inputs, exporter):
    path = exported_by(exporter, tmp_path / "m.onnx")
    batches = np.split(np.load(resnet_inputs), 2)
    bnrepair.recalibrate(path, batches, output=tmp_path / "r.onnx")
    got = stored(tmp_path / "r.onnx")
    want = bn_inputs(resnet18(), batches, train=True)
    assert len(want) == 20
    for name, (mean, var) in want.items():
        std = np.sqrt(var + 1e-5)
        assert np.max(np.abs(got[f"{name}.running_mean"] - mean) / std) < 1e-4
        np.testing.assert_allclose(got[f"{name}.running_var"], var, rtol=1e-4)
