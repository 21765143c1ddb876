"""The shipped torch fixtures are really broken, and recalibration really repairs them.

Real files, real torch, judged on held-out images the models never saw: ``eval()`` accuracy before
(bad), with BN on batch statistics ("training mode", what the model scored while it trained), and
after ``bnrepair recalibrate`` (within 2 points of training mode). Homogeneous batches are repaired
per domain, with that domain's calibration images.
"""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import bnrepair
from bnrepair.cli import app
from fixtures import make_torch, synthetic

FILES = make_torch.OUT
ARCH = f"{make_torch.ARCH}:build"
# (fixture, domain of its calibration and held-out images, flags it needs)
CASES = [("stale_ema.pt", "a", ["--arch", ARCH]), ("never_updated.pt", "a", ["--arch", ARCH]),
         ("frozen_bn.pt", "b", ["--trust-pickle"]), ("homogeneous.pt", "a", ["--trust-code"]),
         ("homogeneous.pt", "b", ["--trust-code"])]
IDS = [f"{name}-{domain}" for name, domain, _ in CASES]
cli = CliRunner()


def load(path, flags):
    return bnrepair.load(path, arch=ARCH, trust_pickle="--trust-pickle" in flags,
                         trust_code="--trust-code" in flags).module


@pytest.fixture(scope="module")
def heldout():
    return {domain: make_torch.heldout(domain) for domain in synthetic.DOMAINS}


@pytest.fixture(scope="module")
def baseline(heldout):
    """(eval() accuracy, training-mode accuracy) of each fixture as shipped."""
    results = {}
    for name, domain, flags in CASES:
        model = load(FILES / name, flags)
        results[(name, domain)] = (make_torch.accuracy(model, *heldout[domain]),
                                   make_torch.batch_stats_accuracy(model, *heldout[domain]))
    return results


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """Each case recalibrated once through the CLI: (loaded output, report)."""
    out = tmp_path_factory.mktemp("repaired")
    results = {}
    for name, domain, flags in CASES:
        target = out / f"{domain}_{name}"
        result = cli.invoke(app, ["recalibrate", str(FILES / name), "--data", str(synthetic.folder(domain, "calib")),
                                  "-o", str(target), "--quiet", *flags])
        assert result.exit_code == 0, result.output
        results[(name, domain)] = load(target, flags)
    return results


@pytest.mark.parametrize("case", [(n, d) for n, d, _ in CASES], ids=IDS)
def test_fixture_scores_well_only_with_batch_statistics(case, baseline):
    before, training = baseline[case]
    assert training > 0.85
    if case == ("homogeneous.pt", "a"):  # the mixture of both domains' statistics breaks b; bright a survives it
        assert before > 0.85
    else:
        assert before < 0.5


@pytest.mark.parametrize("case", [(n, d) for n, d, _ in CASES], ids=IDS)
def test_recalibrated_file_predicts_like_training_mode(case, baseline, repaired, heldout):
    _, training = baseline[case]
    after = make_torch.accuracy(repaired[case], *heldout[case[1]])
    assert abs(after - training) <= 0.02, (after, training)


def test_never_updated_statistics_were_exactly_the_initial_ones(repaired):
    state = torch.load(FILES / "never_updated.pt", weights_only=True)["model"]
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    assert len(means) == 3 and all((m == 0).all() for m in means) and all((v == 1).all() for v in variances)
    fixed = repaired[("never_updated.pt", "a")]
    assert all(m.running_mean.abs().max() > 0.01 for m in fixed.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_frozen_look_alikes_are_reported_frozen_and_stay_look_alikes(repaired):
    runner = bnrepair.load(FILES / "frozen_bn.pt", trust_pickle=True)
    assert [(bn.kind, bn.frozen) for bn in runner.graph.bn_layers] == [("FrozenBatchNorm2d", True)] * 3
    fixed = repaired[("frozen_bn.pt", "b")]
    assert sum(isinstance(m, make_torch.arch.FrozenBatchNorm2d) for m in fixed.modules()) == 3


def test_homogeneous_batches_need_per_domain_statistics(tmp_path, repaired, heldout):
    """One set of statistics from both domains does not repair domain b; b's own images do."""
    both = np.concatenate([synthetic.load_split(d, "calib")[0] for d in synthetic.DOMAINS]).astype(np.float32) / 255
    target = tmp_path / "both.pt"
    bnrepair.recalibrate(FILES / "homogeneous.pt", np.ascontiguousarray(both.transpose(0, 3, 1, 2)), output=target,
                         trust_code=True)
    pooled = make_torch.accuracy(load(target, ["--trust-code"]), *heldout["b"])
    per_domain = make_torch.accuracy(repaired[("homogeneous.pt", "b")], *heldout["b"])
    assert pooled < per_domain - 0.1, (pooled, per_domain)
    on_a = make_torch.accuracy(repaired[("homogeneous.pt", "a")], *heldout["b"])
    assert on_a < per_domain - 0.1, (on_a, per_domain)


def test_in_memory_module_is_repaired_in_place_from_a_data_loader(baseline, heldout):
    """The update_bn drop-in: a module and a DataLoader of (x, y); the module is updated, the report returned."""
    model = load(FILES / "stale_ema.pt", [])
    model.train()
    images, labels = synthetic.load_split("a", "calib")
    x = make_torch.nchw(images.astype(np.float32) / 255)
    loader = DataLoader(TensorDataset(x, torch.from_numpy(labels)), batch_size=32, shuffle=True)
    report = bnrepair.recalibrate(model, loader)
    assert model.training and report.output is None and len(report.layers) == 3 and report.samples == len(x)
    _, training = baseline[("stale_ema.pt", "a")]
    assert abs(make_torch.accuracy(model, *heldout["a"]) - training) <= 0.02
