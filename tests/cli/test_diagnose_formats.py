"""inspect and diagnose on the real torch and SavedModel fixtures, through the same runner protocol as Keras."""

import json
import shlex

import pytest
from typer.testing import CliRunner

from bnrepair.cli import app
from fixtures import make_torch, synthetic

cli = CliRunner()
ARCH = ["--arch", f"{make_torch.ARCH}:build"]
SAVEDMODEL = synthetic.ROOT.parent / "savedmodel"
# fixture, data domain, flags, expected cause
CASES = [(make_torch.OUT / "stale_ema.pt", "a", ARCH, "stale"),
         (make_torch.OUT / "never_updated.pt", "a", ARCH, "never_updated"),
         (make_torch.OUT / "frozen_bn.pt", "b", ["--trust-pickle"], "domain_shift"),
         (make_torch.OUT / "homogeneous.pt", "b", ["--trust-code"], "domain_shift"),
         (make_torch.OUT / "healthy.pt", "a", ARCH, "healthy"),
         (SAVEDMODEL / "keras3_export", "a", [], "stale"),
         (SAVEDMODEL / "tf1_slim", "a", ["--input", "images"], "never_updated")]


@pytest.mark.parametrize("path,domain,flags,cause", CASES, ids=[c[0].name + "-" + c[1] for c in CASES])
def test_verdicts_and_exit_codes(tmp_path, path, domain, flags, cause):
    out = tmp_path / "d.json"
    result = cli.invoke(app, ["diagnose", str(path), "--data",
                              str(synthetic.folder(domain, "heldout")), "--json", str(out), *flags])
    assert result.exit_code == (0 if cause == "healthy" else 1), result.output
    report = json.loads(out.read_text())
    assert report["verdicts"][0]["cause"] == cause
    acc = report["outputs"]["accuracy"]
    assert acc["recalibrated"] >= acc["training"] - 0.02
    if cause == "healthy":
        assert abs(report["outputs"]["expected_gain"]) <= 0.02
    else:
        assert report["outputs"]["expected_gain"] > 0.3 and report["layers"][0]["problem"]
        verdict = report["verdicts"][0]
        assert " ".join(flags) in verdict["fix"]
        assert shlex.split(verdict["fix"])[:2] == ["bnrepair", "recalibrate"] and "(" not in verdict["fix"]
    if cause == "domain_shift":  # "frozen" only where off layers are frozen, in the framework's own words
        frozen = any(layer["frozen"] and layer["problem"] for layer in report["layers"])
        assert report["verdicts"][0]["title"].startswith("frozen ") == frozen
        evidence = " ".join(report["verdicts"][0]["evidence"])
        assert ("trainable=False" in evidence) == (frozen and path.suffix != ".pt"), evidence
    if flags == ARCH:  # a state_dict stores no momentum: the --arch default says nothing about training
        assert not any("decay" in line for v in report["verdicts"] for line in v["evidence"])


def test_inspect_torch_flags_never_updated_without_data():
    result = cli.invoke(app, ["inspect", str(make_torch.OUT / "never_updated.pt"), *ARCH])
    assert result.exit_code == 1 and "updates never ran" in result.output
    assert cli.invoke(app, ["inspect", str(make_torch.OUT / "healthy.pt"), *ARCH]).exit_code == 0


def test_inspect_finds_reused_and_unreached_torch_bn_from_the_graph_alone():
    import torch
    from torch import nn

    import bnrepair

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn, self.spare = nn.Linear(3, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.lin(self.bn(x)))

    model = Shared()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {(f.code, f.layer) for f in bnrepair.inspect(model).flags}
    assert {("reused", "bn"), ("unreached", "spare")} <= flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


SKEWED_ARCH = """
import torch
from torch import nn


def build():
    net = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
        net[1].bias.zero_()
    return net
"""


def test_a_fix_that_loses_labelled_accuracy_is_not_recommended(tmp_path):
    """Statistics stored from balanced classes (+-2 per feature); the calibration data is 95% one class. Its own
    statistics move the decision threshold into that class, so recalibrating on it loses accuracy, which the
    labels show: the verdict says so and recommends no fix."""
    import numpy as np
    import torch

    (tmp_path / "skewed.py").write_text(SKEWED_ARCH)
    rng = np.random.default_rng(0)
    y = (rng.random(512) < 0.95).astype(np.int64)
    x = ((2 * y - 1)[:, None] * 2.0 + rng.normal(0, 1, (512, 4))).astype(np.float32)
    np.savez(tmp_path / "skewed.npz", x=x, y=y)
    state = {"0.weight": torch.ones(4), "0.bias": torch.zeros(4), "0.running_mean": torch.zeros(4),
             "0.running_var": torch.full((4,), 5.0), "0.num_batches_tracked": torch.tensor(1000),
             "1.weight": torch.tensor([[-1.0] * 4, [1.0] * 4]), "1.bias": torch.zeros(2)}
    torch.save(state, tmp_path / "balanced.pt")
    stored_right = ((x.sum(1) > 0) == y).mean()  # the stored statistics' decision, computed here
    out = tmp_path / "d.json"
    result = cli.invoke(app, ["diagnose", str(tmp_path / "balanced.pt"), "--arch", f"{tmp_path / 'skewed.py'}:build",
                              "--data", str(tmp_path / "skewed.npz"), "--json", str(out)])
    assert result.exit_code == 1, result.output
    report = json.loads(out.read_text())
    accuracy = report["outputs"]["accuracy"]
    assert accuracy["inference"] == pytest.approx(stored_right)
    assert accuracy["recalibrated"] < accuracy["inference"] - 0.05
    first = report["verdicts"][0]
    assert first["cause"] == "unrepresentative_data" and "do not recalibrate on this data" in first["title"]
    assert all(verdict["fix"] == "" for verdict in report["verdicts"])
    assert "fix:" not in result.output and "bnrepair recalibrate" not in result.output
    assert f"{accuracy['inference']:.1%}" in result.output
