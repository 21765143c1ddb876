"""Folding real torch modules: every pattern (grouped transposed conv included) folds exactly, every refusal
is refused with its reason, the user's module is untouched, and .pt2 / ONNX outputs match the source."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnrepair
from bench import zoo_models
from fixtures import REPO

onnx = pytest.importorskip("onnx", reason="folding tests export ONNX: pip install '.[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="folding tests run ONNX: pip install '.[onnx]'")

ROOT = REPO
FOLDED = {"bn_conv": "backward", "bn_c1": "backward", "bn_c3": "backward", "bn_grp": "backward",
          "bn_dw": "backward", "bn_tr": "backward", "bn_tr1": "backward", "bn_lin": "backward",
          "bn_lfwd": "forward", "bn_fwd": "forward", "bn_cat": "concat"}
REFUSED = {"bn_act": "activation act (ReLU) sits between conv_a and BN",
           "bn_shared": "the output of conv_s is also used by",
           "bn_fgrp": "conv_g has groups=2",
           "bn_axis": "BN acts on axis 1 but lin_r's channels are on axis 2",
           "bn_twice": "called 2 times"}


class Zoo(nn.Module):
    """One branch per pattern from one (N, 4, 8, 8) input; returns one output per branch."""

    def __init__(self):
        super().__init__()
        self.example_input_shape = (4, 8, 8)
        self.conv_b, self.bn_conv = nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6)
        self.c1, self.bn_c1 = nn.Conv1d(32, 5, 3, padding=1), nn.BatchNorm1d(5)
        self.c3, self.bn_c3 = nn.Conv3d(1, 3, 2, bias=False), nn.BatchNorm3d(3)
        self.grouped, self.bn_grp = nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.dw, self.bn_dw = nn.Conv2d(4, 8, 3, groups=4, padding=1), nn.BatchNorm2d(8)
        self.tr, self.bn_tr = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d(6)
        self.tr1, self.bn_tr1 = nn.ConvTranspose1d(32, 3, 2, stride=2), nn.BatchNorm1d(3)
        self.lin, self.bn_lin = nn.Linear(256, 6), nn.BatchNorm1d(6)
        self.bn_lfwd, self.lin_f = nn.BatchNorm1d(256), nn.Linear(256, 3)
        self.bn_fwd, self.conv_v = nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3)
        self.cat_a, self.cat_b, self.bn_cat = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(5)
        self.conv_a, self.act, self.bn_act = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4)
        self.conv_s, self.bn_shared = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn_fgrp, self.conv_g = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2)
        self.lin_r, self.bn_axis = nn.Linear(8, 5), nn.BatchNorm1d(32)
        self.bn_twice = nn.BatchNorm2d(4)

    def forward(self, x):
        seq = x.reshape(x.shape[0], 32, 8)
        flat = torch.flatten(x, 1)
        shared = self.conv_s(x)
        return (self.bn_conv(self.conv_b(x)), self.bn_c1(self.c1(seq)),
                self.bn_c3(self.c3(x.reshape(x.shape[0], 1, 4, 8, 8))), self.bn_grp(self.grouped(x)),
                self.bn_dw(self.dw(x)), self.bn_tr(self.tr(x)), self.bn_tr1(self.tr1(seq)),
                self.bn_lin(self.lin(flat)), self.lin_f(self.bn_lfwd(torch.relu(flat))),
                self.conv_v(self.bn_fwd(x)), self.bn_cat(torch.cat([self.cat_a(x), self.cat_b(x)], dim=1)),
                self.bn_act(self.act(self.conv_a(x))), self.bn_shared(shared) + shared,
                self.conv_g(self.bn_fgrp(torch.relu(x))), self.bn_axis(self.lin_r(seq)),
                self.bn_twice(self.bn_twice(x)))


def randomised(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                if m.track_running_stats:
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2)
    return module.eval()


@pytest.fixture(scope="module")
def zoo():
    module = randomised(Zoo())
    x = np.random.default_rng(0).random((16, 4, 8, 8), dtype=np.float32)
    pristine = copy.deepcopy(module.state_dict())
    report = bnrepair.fold(module, data=x, batch_size=8)
    return module, x, report, pristine


def outputs(module, x):
    with torch.no_grad():
        return [t.numpy() for t in module(torch.as_tensor(x))]


def test_each_pattern_folds_and_each_refusal_is_refused(zoo):
    module, _, report, pristine = zoo
    assert {row.bn: row.how for row in report.folded} == FOLDED
    reasons = {r.bn: r.reason for r in report.refused}
    assert set(reasons) == set(REFUSED)
    for name, reason in REFUSED.items():
        assert reason in reasons[name]
    kept = {name for name, m in report.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kept == set(REFUSED)
    assert report.model.grouped.bias is not None and module.grouped.bias is None
    for key, value in module.state_dict().items():  # the user's module is untouched
        assert torch.equal(value, pristine[key]), key


def test_folded_outputs_match_within_1e5(zoo):
    module, x, report, _ = zoo
    for inputs in (x, np.random.default_rng(1).normal(0, 1, x.shape).astype(np.float32)):
        before, after = outputs(module, inputs), outputs(report.model, inputs)
        assert 0.3 < max(float(np.abs(b).max()) for b in before) < 30
        assert max(float(np.abs(a - b).max()) for a, b in zip(after, before)) <= 1e-5
    assert all(row.max_abs <= 1e-5 for row in report.folded)


def test_grouped_transposed_conv_folds_where_naive_fusion_cannot():
    """torch's fuse_conv_bn_eval scales the transposed weight's dim 1 (out/groups), not the output channels."""
    tr, bn = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)
    module = randomised(nn.Sequential(tr, bn))
    x = np.random.default_rng(2).random((4, 4, 5, 5), dtype=np.float32)
    report = bnrepair.fold(module, data=x)
    assert [row.how for row in report.folded] == ["backward"]
    assert float(np.abs(outputs(report.model, x)[0] - outputs(module, x)[0]).max()) <= 1e-5
    with pytest.raises(RuntimeError):
        torch.nn.utils.fusion.fuse_conv_bn_eval(tr, bn, transpose=True)


def test_bn_without_running_stats_is_left_in_place():
    module = randomised(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    report = bnrepair.fold(module, data=np.random.default_rng(3).random((8, 3, 6, 6), dtype=np.float32))
    assert [(r.bn, r.reason) for r in report.refused] == [("1", "normalises with batch statistics at inference")]
    assert not report.folded


def test_pt2_keeps_the_fold_and_a_dynamic_batch(zoo, tmp_path):
    x = zoo[1]
    simple = randomised(nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(216, 5), nn.BatchNorm1d(5)))
    bnrepair.fold(simple, tmp_path / "simple.pt2", data=x)
    program = torch.export.load(tmp_path / "simple.pt2")
    assert not [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
    for n in (1, 7):
        got = program.module()(torch.as_tensor(x[:n])).detach().numpy()
        assert float(np.abs(got - outputs(simple, x[:n])).max()) <= 1e-5


@pytest.mark.parametrize("fold", [False, True])
def test_onnx_matches_torch_and_names_the_folded_tensors(zoo, tmp_path, fold):
    module, x, _, _ = zoo
    report = bnrepair.export(module, tmp_path / "zoo.onnx", fold=fold, data=x, batch_size=8)
    proto = onnx.load(tmp_path / "zoo.onnx")
    nodes = [n.op_type for n in proto.graph.node]
    calls = len(REFUSED) + 1  # bn_twice runs twice
    assert nodes.count("BatchNormalization") == (calls if fold else len(FOLDED) + calls)
    initializers = {i.name for i in proto.graph.initializer}
    assert all(t in initializers for row in report.folded for t in row.into)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x[:3]})
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, outputs(module, x[:3]))) <= 1e-4


def test_fixtures_fold_including_frozen_lookalikes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    calib = ROOT / "fixtures" / "data" / "a" / "calib"
    for name, options in (("stale_ema.pt", {"arch": str(ROOT / "fixtures/torch/arch.py") + ":build"}),
                          ("frozen_bn.pt", {"trust_pickle": True})):
        report = bnrepair.fold(ROOT / "fixtures" / "torch" / name, tmp_path / f"{name}.pt2", data=calib,
                               samples=32, **options)
        assert [row.bn for row in report.folded] == ["features.1", "features.5", "features.9"]
        assert not report.refused and all(c.max_abs <= 1e-5 for c in report.checks)


def with_stats(model, var_low: float, var_high: float, samples: int) -> np.ndarray:
    """Give every BN of ``model`` random statistics (means in [-1, 1], variances in [low, high]); a batch for it."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(var_low, var_high)
    return np.random.default_rng(0).normal(0, 1, (samples, 3, 8, 8)).astype(np.float32)


class Residual(nn.Module):
    """torchvision's BasicBlock pattern: in-place ReLU after BN and ``out += identity``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def test_in_place_ops_after_bn_cannot_change_what_verification_compares():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), Residual(), Residual()).eval()
    x = with_stats(model, 0.5, 2, 16)
    report = bnrepair.fold(model, data=x)
    assert len(report.folded) == 5 and not report.refused
    assert max(row.max_abs for row in report.folded) <= 1e-4
    with torch.no_grad():
        np.testing.assert_allclose(report.model(torch.as_tensor(x)).numpy(), model(torch.as_tensor(x)).numpy(),
                                   atol=1e-5)


@pytest.mark.parametrize("wrong", ["eps", "channel"])
def test_a_wrong_fold_is_caught_and_nothing_is_written(tmp_path, monkeypatch, wrong):
    """A fold that is subtly wrong (eps 10x off, two channels swapped) fails verification under the scaled
    tolerance that lets correct float32 folds through."""
    from bnrepair import folding

    exact = folding.bn_affine

    def broken(mean, var, eps, gamma=None, beta=None):
        scale, shift = exact(mean, var, eps * 10 if wrong == "eps" else eps, gamma, beta)
        if wrong == "channel":
            scale, shift = scale[[1, 0, *range(2, len(scale))]], shift[[1, 0, *range(2, len(shift))]]
        return scale, shift

    monkeypatch.setattr("bnrepair.frameworks.torch.fold.bn_affine", broken)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), Residual()).eval()
    x = with_stats(model, 1e-3, 2e-3, 16)  # small variances: eps matters
    with pytest.raises(bnrepair.errors.BnrepairError, match="verification failed"):
        bnrepair.fold(model, tmp_path / "m.pt2", data=x)
    assert not list(tmp_path.iterdir())


def test_bn_folds_through_inference_identities():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.Identity(), nn.Dropout2d(0.2), nn.BatchNorm2d(4)).eval()
    x = with_stats(model, 0.5, 2, 8)
    report = bnrepair.fold(model, data=x)
    assert {row.bn for row in report.folded} == {"2", "7"} and not report.refused
    assert not any(isinstance(m, nn.BatchNorm2d) for m in report.model.modules())
    with torch.no_grad():
        np.testing.assert_allclose(report.model(torch.as_tensor(x)).numpy(), model(torch.as_tensor(x)).numpy(),
                                   atol=1e-5)


class BatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` shape: ``act(drop(bn(x)))`` in one module, with ``drop`` and ``act`` children."""

    def __init__(self, channels):
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), nn.SiLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class OwnConv(nn.Conv2d):
    """A conv defined outside torch.nn (torchvision's ``Conv3DSimple`` shape), which fx would trace through."""


def test_bn_act_modules_fold_their_bn_and_keep_their_activation():
    torch.manual_seed(0)
    model = nn.Sequential(OwnConv(3, 4, 3), BatchNormAct(4), nn.Conv2d(4, 4, 1), BatchNormAct(4)).eval()
    x = with_stats(model, 0.5, 2, 8)
    report = bnrepair.fold(model, data=x)
    assert {row.bn for row in report.folded} == {"1", "3"} and not report.refused
    assert sum(isinstance(m, nn.SiLU) for m in report.model.modules()) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in report.model.modules())
    with torch.no_grad():
        np.testing.assert_allclose(report.model(torch.as_tensor(x)).numpy(), model(torch.as_tensor(x)).numpy(),
                                   atol=1e-5)


def test_a_forward_and_a_backward_fold_into_one_conv_compose(tmp_path):
    """ReLU -> BN -> Conv1d(k=1) -> BN (the zoo's ``composed_fold``): ``pre`` folds forward into ``mix``,
    ``bn_mix`` backward into it. Verification used to compare ``mix`` alone with the folded ``mix``, which holds
    ``bn_mix`` too, and refused an exact fold; the reference is the source module's own output in float64."""
    module = randomised(zoo_models.torch_model("composed_fold"))
    x = np.random.default_rng(0).normal(size=(64, 1, 20)).astype(np.float32)
    report = bnrepair.fold(module, tmp_path / "composed.pt2", data=x)
    assert {row.bn: (row.how, row.into) for row in report.folded} == {
        "pre": ("forward", ["mix.weight", "mix.bias"]), "bn_mix": ("backward", ["mix.weight", "mix.bias"])}
    program = torch.export.load(tmp_path / "composed.pt2")
    assert not [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
    want = copy.deepcopy(module).double()(torch.as_tensor(x, dtype=torch.float64)).detach().numpy()
    got = program.module()(torch.as_tensor(x)).detach().numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


class Flagged(nn.Module):
    """A Python flag with a default in ``forward``, as a trained pitch tracker has (``embed=False``)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x, embed=False, scale=None):
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        if scale is not None:
            x = x * scale
        return x if embed else self.head(x)


def test_a_flag_in_forward_folds_and_exports_as_the_module_runs_by_default(tmp_path):
    module = randomised(Flagged())
    x = np.random.default_rng(0).random((8, 3, 10, 10), dtype=np.float32)
    report = bnrepair.export(module, tmp_path / "flagged.onnx", fold=True, data=x)
    assert [row.bn for row in report.folded] == ["bn"]
    proto = onnx.load(tmp_path / "flagged.onnx")
    assert [i.name for i in proto.graph.input] == ["input"]
    assert "BatchNormalization" not in [n.op_type for n in proto.graph.node]
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    want = copy.deepcopy(module).double()(torch.as_tensor(x, dtype=torch.float64)).detach().numpy()
    assert np.abs(got[0] - want).max() <= 1e-5 * np.abs(want).max()


def deep_chain(depth=60, width=16):
    """Conv -> BN -> ReLU sixty times, BN gains 1.6: rounding grows with depth as in efficientnet's last blocks."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    module = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = np.random.default_rng(0).random((16, 3, 16, 16), dtype=np.float32)
    bnrepair.recalibrate(module, x)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(1.6)
    return module, x


def test_a_deep_nets_accumulated_rounding_never_refuses_an_exact_fold():
    """The deepest folds differ from the source by more than rtol 1e-4 of the layer's scale, as float32 itself does
    there (the source's change when its input moves by two ulps): judged by that yardstick, every fold passes, and
    the folded model matches a float64 run of the source as closely as the float32 source does."""
    module, x = deep_chain()
    with pytest.raises(bnrepair.errors.VerificationError, match="folded layer"):
        bnrepair.fold(module, data=x, noise_margin=0)  # atol / rtol alone refuse it
    report = bnrepair.fold(module, data=x)
    assert len(report.folded) == 60 and max(row.max_rel for row in report.folded) > 1e-4
    assert all(row.max_abs <= 16 * row.float32_noise or row.max_rel <= 1e-4 for row in report.folded)
    exact = copy.deepcopy(module).double()(torch.as_tensor(x, dtype=torch.float64)).detach().numpy()
    source_error = np.abs(outputs(module, x)[0] - exact).max()
    folded_error = np.abs(outputs(report.model, x)[0] - exact).max()
    assert folded_error <= 4 * source_error


def test_a_wrong_fold_is_refused_whatever_float32s_own_error(monkeypatch):
    """A fold one BN channel off by 0.2% of its scale: far beyond rounding, refused even with a huge margin."""
    import bnrepair.folding as folding

    module, x = deep_chain(depth=4)
    real = folding.bn_affine

    def off(*args, **kwargs):
        scale, shift = real(*args, **kwargs)
        return scale * np.r_[1.002, np.ones(len(scale) - 1)], shift

    monkeypatch.setattr("bnrepair.frameworks.torch.fold.bn_affine", off)
    with pytest.raises(bnrepair.errors.VerificationError, match="verification failed"):
        bnrepair.fold(module, data=x, noise_margin=1e9)


class Checked(nn.Module):
    """A top-level ``forward`` fx cannot trace (it branches on the input's shape, as Hugging Face's embeddings do)
    around sub-modules it can; one of them is called with a keyword argument."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.body = Flagged()

    def forward(self, x):
        if x.shape[-1] > 64:
            raise ValueError("too wide")
        x = self.stem(x)
        return torch.cat([self.body(x[:, :3]), self.body(x[:, 3:6], embed=True)[:, :5]], 1)


def test_a_module_fx_cannot_trace_folds_inside_the_sub_modules_it_calls_with_tensors_alone(tmp_path):
    module = randomised(Checked())
    x = np.random.default_rng(0).random((8, 3, 12, 12), dtype=np.float32)
    report = bnrepair.export(module, tmp_path / "checked.onnx", fold=True, data=x)
    assert {row.bn: (row.how, row.into) for row in report.folded} == {"stem.1": ("backward", ["stem.0.weight",
                                                                                             "stem.0.bias"])}
    assert [(row.bn, row.reason) for row in report.refused] == [
        ("body.bn", "inside the module, which torch.fx cannot trace (kept whole)")]
    proto = onnx.load(tmp_path / "checked.onnx")
    assert [n.op_type for n in proto.graph.node].count("BatchNormalization") == 2  # body.bn, called twice
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    want = copy.deepcopy(module).double()(torch.as_tensor(x, dtype=torch.float64)).detach().numpy()
    assert np.abs(got[0] - want).max() <= 1e-5 * np.abs(want).max()
