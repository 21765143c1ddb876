"""The torch runner on in-memory modules: exact statistics, the update_bn calling conventions, nothing else touched.

Restates torch's own ``update_bn`` tests and fvcore's PreciseBN tests for ``bnrepair.recalibrate``:
population mean / variance of the BN input, uneven batches, prior buffers, ``(x,)`` vs ``(x, y)``,
flags and momentum restored, parameters bit-identical; plus what update_bn gets wrong (Dropout).
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnrepair
from bnrepair.errors import BnrepairError, InputError

torch.manual_seed(0)


def population(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance over every position but channel axis 1, in float64."""
    x = x.detach().double()
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).numpy()
    return flat.mean(axis=1), flat.var(axis=1, ddof=1)


def stats(bn) -> tuple[np.ndarray, np.ndarray]:
    return bn.running_mean.double().numpy(), bn.running_var.double().numpy()


def batches(x, sizes, with_labels=True):
    out, start = [], 0
    for size in sizes:
        xb = x[start:start + size]
        out.append((xb, torch.zeros(len(xb))) if with_labels else (xb,))
        start += size
    assert start == len(x)
    return out


def linear_bn():
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def conv_bn():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return {"dense": torch.randn(100, 5, generator=g) * 3 + 2,
            "image": torch.randn(100, 3, 8, 8, generator=g) * 2 - 1}


@pytest.mark.parametrize("make,kind", [(linear_bn, "dense"), (conv_bn, "image")])
def test_population_mean_and_variance_of_the_bn_input(make, kind, data):
    model = make()
    x = data[kind]
    report = bnrepair.recalibrate(model, DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=16))
    mean, var = population(model[0](x))
    np.testing.assert_allclose(stats(model[1])[0], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats(model[1])[1], var, rtol=1e-5)
    assert report.samples == 100 and report.framework == "torch" and report.output is None


@pytest.mark.parametrize("make,kind", [(linear_bn, "dense"), (conv_bn, "image")])
def test_uneven_batches_give_the_even_result(make, kind, data):
    even, uneven = make(), make()
    uneven.load_state_dict(even.state_dict())
    x = data[kind]
    bnrepair.recalibrate(even, batches(x, [20] * 5))
    bnrepair.recalibrate(uneven, batches(x, [1, 33, 7, 58, 1]))  # batches of one included
    for a, b in zip(stats(even[1]), stats(uneven[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_prior_buffers_do_not_matter(data):
    fresh, garbage = linear_bn(), linear_bn()
    garbage.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        garbage[1].running_mean.uniform_(-100, 100)
        garbage[1].running_var.uniform_(0, 1e4)
    for model in (fresh, garbage):
        bnrepair.recalibrate(model, batches(data["dense"], [32, 32, 36]))
    assert torch.equal(fresh[1].running_mean, garbage[1].running_mean)
    assert torch.equal(fresh[1].running_var, garbage[1].running_var)


def test_tuple_with_or_without_labels_and_bare_tensors_agree(data):
    x = data["image"]
    models = [conv_bn() for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    bnrepair.recalibrate(models[0], batches(x, [50, 50], with_labels=True))
    bnrepair.recalibrate(models[1], batches(x, [50, 50], with_labels=False))
    bnrepair.recalibrate(models[2], [x[:50], x[50:]])
    for m in models[1:]:
        assert torch.equal(m[1].running_mean, models[0][1].running_mean)
        assert torch.equal(m[1].running_var, models[0][1].running_var)


def test_flags_momentum_counters_and_parameters_are_left_as_they_were(data):
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=None), nn.Dropout(0.3),
                          nn.Linear(8, 4), nn.BatchNorm1d(4, momentum=0.3))
    model.train()
    model[2].eval()
    model[4].eval()
    model[1].num_batches_tracked.fill_(7)
    flags = [m.training for m in model.modules()]
    params = copy.deepcopy(dict(model.named_parameters()))
    counters = [model[1].num_batches_tracked.clone(), model[4].num_batches_tracked.clone()]
    bnrepair.recalibrate(model, batches(data["dense"], [40, 40, 20]))
    assert [m.training for m in model.modules()] == flags
    assert model[1].momentum is None and model[4].momentum == 0.3
    assert torch.equal(model[1].num_batches_tracked, counters[0])
    assert torch.equal(model[4].num_batches_tracked, counters[1])
    for name, p in model.named_parameters():
        assert p.dtype == params[name].dtype and torch.equal(p.view(torch.uint8), params[name].view(torch.uint8))
    assert "forward" not in model[1].__dict__ and "forward" not in model[4].__dict__


def test_dropout_before_bn_gives_the_dropout_off_statistics(data):
    """update_bn runs the model in train(), so Dropout inflates the variance it records; we do not."""
    x = data["dense"]
    ours = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.BatchNorm1d(16))
    theirs = copy.deepcopy(ours)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=25)
    bnrepair.recalibrate(ours, loader)
    torch.manual_seed(0)
    torch.optim.swa_utils.update_bn(loader, theirs)
    mean, var = population(ours[0](x))
    np.testing.assert_allclose(stats(ours[2])[0], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats(ours[2])[1], var, rtol=1e-5)
    assert np.median(stats(theirs[2])[1] / var) > 1.5  # Dropout(0.5) scales kept units by 2


class LookAlike(nn.Module):
    """torchvision's FrozenBatchNorm2d in miniature: every tensor a buffer."""

    def __init__(self, n):
        super().__init__()
        for name, value in (("weight", torch.rand(n) + 0.5), ("bias", torch.randn(n)),
                            ("running_mean", torch.zeros(n)), ("running_var", torch.ones(n))):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[None, :, None, None]


class Zoo(nn.Module):
    """One of every BN kind, each fed straight from the input so its true statistics are known."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 4, 3) for _ in range(6)])
        self.bns = nn.ModuleDict({
            "sync": nn.SyncBatchNorm(4), "lazy": nn.LazyBatchNorm2d(), "plain": nn.BatchNorm2d(4, affine=False),
            "cma": nn.BatchNorm2d(4, momentum=None), "frozen": LookAlike(4),
            "untracked": nn.BatchNorm2d(4, track_running_stats=False)})
        self.conv3d = nn.Conv3d(3, 2, (1, 3, 3))
        self.bn3d = nn.BatchNorm3d(2)
        self.conv1d = nn.Conv1d(3, 5, 3)
        self.bn1d = nn.BatchNorm1d(5)

    def inputs(self, x):
        named = {name: conv(x) for name, conv in zip(self.bns, self.convs)}
        named["bn3d"] = self.conv3d(x.unsqueeze(2))
        named["bn1d"] = self.conv1d(x.flatten(2))  # (N, C, L): BatchNorm1d over N and L
        return named

    def forward(self, x):
        outs = [self.bns[k](v) if k in self.bns else getattr(self, k)(v) for k, v in self.inputs(x).items()]
        return torch.cat([o.flatten(2).mean(2) for o in outs], 1)


def test_every_bn_kind_gets_its_population_statistics(data):
    x = data["image"]
    model = Zoo()
    model(x[:2])  # materialise the lazy layer
    report = bnrepair.recalibrate(model, batches(x, [30, 30, 40]))
    runner = bnrepair.load(model)
    kinds = {bn.id: bn for bn in runner.graph.bn_layers}
    assert kinds["bns.untracked"].tracks_stats is False
    assert {layer.id for layer in report.layers} == set(kinds) - {"bns.untracked"}
    assert [layer.id for layer in report.layers if layer.frozen] == ["bns.frozen"]
    assert kinds["bns.sync"].kind == "SyncBatchNorm" and kinds["bns.lazy"].kind == "BatchNorm2d"
    assert kinds["bns.cma"].momentum is None and kinds["bns.plain"].scale is False
    with torch.no_grad():
        inputs = model.inputs(x)
    for name, value in inputs.items():
        bn = model.bns[name] if name in model.bns else getattr(model, name)
        if name == "untracked":
            continue
        mean, var = population(value)
        np.testing.assert_allclose(stats(bn)[0], mean, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(stats(bn)[1], var, rtol=1e-5, err_msg=name)


def test_unmaterialised_lazy_layer_is_a_clear_error():
    with pytest.raises(BnrepairError, match="LazyBatchNorm that is not materialised"):
        bnrepair.recalibrate(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d()), [torch.randn(4, 3, 8, 8)])


def test_eval_mode_does_not_depend_on_batch_size(data):
    x = data["image"]
    a = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5))
    b = copy.deepcopy(a)
    ra = bnrepair.recalibrate(a, batches(x, [10] * 10), mode="eval")
    rb = bnrepair.recalibrate(b, batches(x, [64, 36]), mode="eval")
    assert ra.converged and rb.converged
    for layer in (1, 4):
        for sa, sb in zip(stats(a[layer]), stats(b[layer])):
            np.testing.assert_allclose(sa, sb, rtol=1e-4)


def test_eval_mode_that_reaches_its_limit_keeps_to_it_and_warns(data):
    """A shuffling DataLoader gets plain passes only; stopped by ``max_passes``, the API keeps to it and says so
    with a Python warning (a training script's log would otherwise show nothing)."""
    x = data["image"]
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())])
    loader = DataLoader(TensorDataset(x), batch_size=10, shuffle=True)
    with pytest.warns(UserWarning, match="did not converge in 3 passes"):
        report = bnrepair.recalibrate(model, loader, mode="eval", max_passes=3, tol=0.0)
    assert not report.converged and report.passes == 3


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_torchscript_capture_matches_eager(compile_with, data):
    """Graph instrumentation of a ScriptModule measures what forward patching measures on the eager twin."""
    x = data["image"]
    eager = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(216, 7),
                          nn.Dropout(0.5), nn.BatchNorm1d(7))
    with pytest.warns((DeprecationWarning, FutureWarning)):  # torch 2.14 says FutureWarning
        compiled = (torch.jit.script(copy.deepcopy(eager)) if compile_with == "script"
                    else torch.jit.trace(copy.deepcopy(eager).eval(), x[:4]))
    compiled.train()
    for mode in ("train", "eval"):
        bnrepair.recalibrate(eager, batches(x, [33, 33, 33, 1]), mode=mode)
        bnrepair.recalibrate(compiled, batches(x, [33, 33, 33, 1]), mode=mode)
        for i in ("1", "6"):
            for a, b in zip(stats(getattr(eager, i)), stats(getattr(compiled, i))):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert compiled.training and int(getattr(compiled, "1").num_batches_tracked) == 0


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_torchscript_eval_makes_the_eager_twins_corrected_passes(compile_with):
    """Eval mode's drift-corrected passes reach TorchScript too (the graph's BN nodes fed ``drift.corrected``):
    pass for pass the same changes as the eager module, where plain passes alone would take one per BN layer."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    for _ in range(6):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    eager = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 64, 7), nn.BatchNorm1d(7)).eval()
    x = torch.randn(64, 3, 8, 8)
    with pytest.warns((DeprecationWarning, FutureWarning)):  # torch 2.14 says FutureWarning
        compiled = (torch.jit.script(copy.deepcopy(eager)) if compile_with == "script"
                    else torch.jit.trace(copy.deepcopy(eager), x[:4]))
    reports = [bnrepair.recalibrate(m, batches(x, [16] * 4), mode="eval") for m in (eager, compiled)]
    assert reports[0].converged and reports[1].converged and reports[0].passes == reports[1].passes < 8
    np.testing.assert_allclose(reports[1].change_per_pass[:-1], reports[0].change_per_pass[:-1], rtol=1e-3, atol=1e-5)
    for a, b in zip(eager.modules(), compiled.modules()):
        if isinstance(a, nn.modules.batchnorm._BatchNorm):
            np.testing.assert_allclose(stats(b), stats(a), rtol=1e-5, atol=1e-6)


class Residual(nn.Module):
    """torchvision's InvertedResidual in small: its BN runs inside ``if self.use_res_connect``."""

    def __init__(self, use_res_connect: bool):
        super().__init__()
        self.use_res_connect = use_res_connect
        self.conv = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6())

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torchscript_bn_inside_a_flag_steered_branch_is_measured(mode):
    """A scripted module's bool flags are read as their values, so the ``if`` they steer folds away and the BN
    inside it is measured like its eager twin's (it was refused: not at the graph's top level)."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Residual(True), Residual(False), Residual(True)).eval()
    with pytest.warns((DeprecationWarning, FutureWarning)):  # torch 2.14 says FutureWarning
        scripted = torch.jit.script(copy.deepcopy(eager))
    x = torch.randn(48, 3, 8, 8)
    reports = [bnrepair.recalibrate(m, batches(x, [16] * 3), mode=mode) for m in (eager, scripted)]
    assert reports[0].passes == reports[1].passes and len(reports[1].layers) == 3
    for a, b in zip(eager.modules(), scripted.modules()):
        if isinstance(a, nn.modules.batchnorm._BatchNorm):
            np.testing.assert_allclose(stats(b), stats(a), rtol=1e-5, atol=1e-6)
    assert not scripted.training  # the flags read as values were not changed on the module


def test_dict_batches_are_keyword_arguments_and_tuples_positional(data):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, features, shift=0.0):
            return self.bn(self.fc(features) + shift)

    x = data["dense"]
    by_name, by_position = TwoInputs(), TwoInputs()
    by_position.load_state_dict(by_name.state_dict())
    bnrepair.recalibrate(by_name, [{"features": x[:60], "shift": 10.0}, {"features": x[60:], "shift": 10.0}])
    bnrepair.recalibrate(by_position, [((x[:60], torch.tensor(10.0)), "label"), ((x[60:], torch.tensor(10.0)), None)])
    mean, var = population(by_name.fc(x) + 10.0)
    for model in (by_name, by_position):
        np.testing.assert_allclose(stats(model.bn)[0], mean, rtol=1e-5)
        np.testing.assert_allclose(stats(model.bn)[1], var, rtol=1e-5)


def test_numpy_float64_arrays_are_cast_and_streamed():
    model = conv_bn()
    x = np.random.default_rng(2).normal(0.5, 2.0, (70, 3, 8, 8))
    bnrepair.recalibrate(model, x, batch_size=16)
    mean, var = population(model[0](torch.from_numpy(x).float()))
    np.testing.assert_allclose(stats(model[1])[0], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats(model[1])[1], var, rtol=1e-5)


def test_device_choice_for_an_in_memory_module():
    model = linear_bn()
    assert str(bnrepair.load(model).device) == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BnrepairError, match="no CUDA device"):
        bnrepair.recalibrate(model, [torch.randn(4, 5)], device="cuda")


class BatchNormAct(nn.BatchNorm2d):
    """BN, then an activation, in one module: the shape of timm's ``BatchNormAct2d``."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(super().forward(x))


class FrozenBN(nn.Module):
    """Fixed statistics as buffers, its own arithmetic: the shape of torchvision's ``FrozenBatchNorm2d``."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("weight", torch.rand(channels) + 0.5)
        self.register_buffer("bias", torch.randn(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[None, :, None, None]


def subclass_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct(8), nn.Conv2d(8, 8, 3), FrozenBN(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


def reference_train_stats(model, chunks):
    """PreciseBN by definition: a copy in train() (the BN modules then normalise with batch statistics in their
    own forward), every BN input recorded by a pre-hook and pooled in float64; FrozenBN is given the batch's
    statistics by hand, as train() cannot."""
    twin = copy.deepcopy(model).train()
    seen: dict[str, list] = {}

    def record(name):
        def hook(module, args):
            x = args[0].detach()
            seen.setdefault(name, []).append(x.double())
            if isinstance(module, FrozenBN):
                module.running_mean = x.mean((0, 2, 3))
                module.running_var = x.var((0, 2, 3), unbiased=False)
        return hook

    for name, m in twin.named_modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBN)):
            m.register_forward_pre_hook(record(name))
    with torch.no_grad():
        for x in chunks:
            twin(x)
    return {name: population(torch.cat(xs)) for name, xs in seen.items()}


def test_bn_subclasses_run_their_own_forward_while_measured():
    model = subclass_net().eval()
    x = torch.randn(90, 3, 12, 12) * 2 + 1
    chunks = [x[:32], x[32:64], x[64:]]
    want = reference_train_stats(model, chunks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = bnrepair.recalibrate(model, chunks, mode="train")
    assert {layer.id for layer in report.layers} == {"1", "3", "6"}
    for name, (mean, var) in want.items():
        got = dict(model.named_modules())[name]
        np.testing.assert_allclose(stats(got)[0], mean, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(stats(got)[1], var, rtol=1e-5, atol=1e-6, err_msg=name)
    for key, value in model.state_dict().items():  # everything but the statistics is bit-identical
        if not key.endswith(("running_mean", "running_var")):
            assert torch.equal(value, before[key]), key


def test_samples_stops_an_endless_loader_and_cuts_the_last_batch():
    x = torch.randn(1000, 5) * 2 + 1

    def endless():
        while True:
            for i in range(0, 1000, 64):
                yield x[i:i + 64], torch.zeros(64)

    model = linear_bn()
    report = bnrepair.recalibrate(model, endless(), samples=150)
    assert report.samples == 150
    want = population(model[0](x[:150]))
    np.testing.assert_allclose(stats(model[1])[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(stats(model[1])[1], want[1], rtol=1e-5)


def test_a_float64_module_keeps_float64_and_a_torch_device_is_taken():
    model = linear_bn().double()
    x = np.random.default_rng(0).normal(3, 2, (64, 5))  # float64 arrays, as numpy makes them
    bnrepair.recalibrate(model, x, batch_size=16, device=torch.device("cpu"))
    assert model[1].running_mean.dtype == torch.float64
    want = population(model[0](torch.as_tensor(x)))
    np.testing.assert_allclose(stats(model[1])[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(stats(model[1])[1], want[1], rtol=1e-12)


def test_a_module_without_bn_gets_a_report_that_says_so():
    report = bnrepair.recalibrate(nn.Sequential(nn.Linear(5, 2)), [torch.randn(4, 5)])
    assert report.layers == [] and report.framework == "torch" and "no BatchNorm layers" in report.summary()


class WithAuxHead(nn.Module):
    """Inception's shape: an auxiliary head that only training runs."""

    def __init__(self):
        super().__init__()
        self.main = conv_bn()
        self.aux = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        out = self.main(x)
        return (out, self.aux(x)) if self.training else out


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layers_inference_never_reaches_are_left_alone_with_a_note(mode, data):
    model = WithAuxHead().eval()
    before = model.aux[1].running_mean.clone()
    report = bnrepair.recalibrate(model, batches(data["image"], [50, 50]), mode=mode)
    assert report.unreached == ["aux.1"] and [layer.id for layer in report.layers] == ["main.1"]
    assert torch.equal(model.aux[1].running_mean, before)
    assert "inference never reaches unchanged (aux.1)" in report.summary()
    np.testing.assert_allclose(stats(model.main[1])[0], population(model.main[0](data["image"]))[0], rtol=1e-5)


def test_a_mean_far_larger_than_the_spread_keeps_float32_relative_precision():
    """Inception-like activations: means 3e4 to 3e5 times the spread. The reference is float64 over the same float32
    inputs; the variance keeps float32's relative precision, the mean is right to the float32 buffer's last bit."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4096, 3, 7, 7, generator=g) + torch.tensor([3e4, -1e5, 3e5])[None, :, None, None]).float()
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    bnrepair.recalibrate(model, batches(x, [512] * 8, with_labels=False))
    mean, var = population(x)
    np.testing.assert_allclose(stats(model[0])[1], var, rtol=1e-5)
    assert np.all(np.abs(stats(model[0])[0] - mean) <= np.spacing(np.abs(mean).astype(np.float32)))


def test_statistics_a_float16_buffer_cannot_hold_are_refused():
    """A float16 running_var cannot hold 1e6: the cast would write inf with exit 0."""
    model = nn.Sequential(nn.BatchNorm1d(3)).half().eval()
    x = np.random.default_rng(0).normal(0, 1000, (64, 3)).astype(np.float32)
    before = model[0].running_var.clone()
    with pytest.raises(InputError, match=r"0.running_var is stored as float16, which cannot hold"):
        bnrepair.recalibrate(model, x)
    assert torch.equal(model[0].running_var, before)


def test_amp_runs_the_forward_in_bfloat16_and_keeps_the_statistics_within_its_precision(tmp_path):
    """--amp bf16 (CPU autocast here; the same path on CUDA): the statistics move by bfloat16's rounding of the
    activations, not more, and the module's own buffers stay float32."""
    from pathlib import Path

    from fixtures import synthetic

    root = Path(__file__).resolve().parents[3]
    fixture = root / "fixtures" / "torch" / "stale_ema.pt"
    arch = str(root / "fixtures" / "torch" / "arch.py") + ":build"
    calib = synthetic.folder("a", "calib")
    full = bnrepair.recalibrate(fixture, calib, output=tmp_path / "f32.pt", arch=arch)
    half = bnrepair.recalibrate(fixture, calib, output=tmp_path / "bf16.pt", arch=arch, amp="bf16")
    assert full.samples == half.samples
    a, b = (torch.load(tmp_path / name, weights_only=True) for name in ("f32.pt", "bf16.pt"))
    a, b = a.get("state_dict", a), b.get("state_dict", b)
    means = [k for k in a if k.endswith("running_mean")]
    assert means and all(b[k].dtype == torch.float32 for k in means)
    for key in means:
        var = key.replace("running_mean", "running_var")
        shift = ((b[key] - a[key]).abs() / a[var].sqrt()).max().item()
        ratio = (b[var] / a[var]).log().abs().max().item()
        assert shift < 0.05 and ratio < 0.05, (key, shift, ratio)  # bfloat16 keeps 8 bits of mantissa
    assert any(not torch.equal(a[k], b[k]) for k in means)  # autocast took effect
    with pytest.raises(InputError, match="--amp must be one of bf16, fp16"):
        bnrepair.recalibrate(fixture, calib, output=tmp_path / "x.pt", arch=arch, amp="fp8")


def test_what_is_built_from_a_module_is_kept_for_its_next_call_rebuilt_when_it_changes_and_released_with_it():
    """Called once an epoch as ``update_bn`` is, eval mode must not trace the module again; a module changed since
    (a BN now called twice) is traced again, and nothing is kept once the module is gone."""
    import gc
    import weakref

    from bnrepair.frameworks.torch.runner import _BUILT

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    first = bnrepair.load(model).call_counts()
    assert first == {"1": 1} and bnrepair.load(model).call_counts() is first
    model.append(model[1])
    assert bnrepair.load(model).call_counts() == {"1": 2}
    kept, released = len(_BUILT), weakref.ref(model)
    del model
    gc.collect()
    assert released() is None and len(_BUILT) < kept  # the cache holds no module alive
