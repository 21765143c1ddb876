"""The files today's PyTorch ecosystem writes: ``.safetensors`` state_dicts (timm, Hugging Face), read with the
safetensors library and repaired in place of the BN tensors' bytes, and Lightning-style checkpoints whose
state_dict keys carry the LightningModule's attribute as a prefix. Statistics are checked against torch's own
training-mode BN on the whole calibration set as one batch."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnrepair.cli import app
from fixtures import REPO

safetensors_torch = pytest.importorskip("safetensors.torch")

if str(REPO) not in sys.path:  # the architecture file's classes are fixtures.torch.arch.*
    sys.path.insert(0, str(REPO))

from fixtures.torch import arch  # noqa: E402

ARCH = f"{REPO / 'fixtures' / 'torch' / 'arch.py'}:build"
cli = CliRunner()


def table(path):
    """The file's header: tensor name -> (dtype, shape, byte range), in file order, and its metadata."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return header.pop("__metadata__", None), header


def broken_state(dtype=torch.float32):
    """The fixtures' architecture with random weights and stale statistics, as a state_dict in ``dtype``."""
    torch.manual_seed(0)
    model = arch.build()
    rng = np.random.default_rng(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.as_tensor(rng.normal(0, 3, m.num_features)))
            m.running_var.copy_(torch.as_tensor(rng.uniform(5, 9, m.num_features)))
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def reference(state, x, batch_size: int):
    """Each BN's statistics as PreciseBN defines them, in float64: the BN layers normalise each batch with its own
    statistics (torch's training mode, the rest in eval mode) while their inputs are kept; mean and unbiased
    variance pooled over every sample and position of every batch."""
    model = arch.build().double()
    model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    model.eval()
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
            m.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(torch.as_tensor(x[i:i + batch_size], dtype=torch.float64))
    want = {}
    for name, inputs in seen.items():
        flat = torch.cat(inputs).transpose(0, 1).reshape(len(inputs[0][0]), -1)
        want[f"{name}.running_mean"], want[f"{name}.running_var"] = flat.mean(1), flat.var(1)
    return want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_safetensors_state_dict_is_repaired_in_place_of_its_bn_bytes(tmp_path, dtype):
    state = broken_state(dtype)
    source, fixed = tmp_path / "model.safetensors", tmp_path / "model.recalibrated.safetensors"
    safetensors_torch.save_file(state, source, metadata={"format": "pt", "source": "test"})
    x = np.random.default_rng(1).random((48, 3, 32, 32), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    before = source.read_bytes()
    done = cli.invoke(app, ["recalibrate", str(source), "--arch", ARCH, "-d", str(tmp_path / "x.npy"),
                            "--batch-size", "48", "-q"])  # one batch: no order to match
    assert done.exit_code == 0, done.output
    assert source.read_bytes() == before  # the input is never modified
    assert table(fixed) == table(source)  # keys, order, dtypes, shapes, offsets and metadata
    got, was = safetensors_torch.load_file(fixed), safetensors_torch.load_file(source)
    want = reference(state, x, len(x))
    bf16 = dtype == torch.bfloat16
    for name, value in got.items():
        assert value.dtype == was[name].dtype
        if name in want:
            scale = want[name.replace("running_mean", "running_var")].sqrt() if "mean" in name else want[name]
            error = ((value.double() - want[name]).abs() / scale).max().item()
            assert error < (1e-2 if bf16 else 1e-4), (name, error)  # bfloat16 keeps 8 bits
            assert not torch.equal(value, was[name])
        else:
            assert torch.equal(value, was[name]), name


def test_a_damaged_safetensors_file_is_one_line_and_nothing_is_written(tmp_path):
    source = tmp_path / "model.safetensors"
    safetensors_torch.save_file(broken_state(), source)
    data = source.read_bytes()
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 32, 32), np.float32))
    cases = {"truncated": data[: len(data) - 100], "header beyond the file": (10**6).to_bytes(8, "little") + data[8:]}
    for what, damaged in cases.items():
        source.write_bytes(damaged)
        done = cli.invoke(app, ["recalibrate", str(source), "--arch", ARCH, "-d", str(tmp_path / "x.npy"), "-q"])
        assert done.exit_code == 2, (what, done.output)
        assert len(done.output.strip().splitlines()) == 1 and str(source) in done.output, (what, done.output)
        assert "damaged safetensors file" in done.output, (what, done.output)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "x.npy"], what


def lightning_checkpoint(state):
    """A checkpoint dict as PyTorch Lightning's ``trainer.save_checkpoint`` writes it: the LightningModule's
    state_dict (the network under its attribute ``model.``, a loss buffer beside it) and the trainer's state."""
    return {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.5.0",
            "state_dict": {**{f"model.{k}": v for k, v in state.items()}, "loss_fn.pos_weight": torch.ones(4)},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(120.0)}}, "param_groups": [{"lr": 0.1}]}],
            "lr_schedulers": [], "hyper_parameters": {"lr": 0.1}}


def test_a_lightning_checkpoint_is_repaired_with_the_inner_network_as_arch(tmp_path):
    state = broken_state()
    source = tmp_path / "epoch=3.ckpt"
    torch.save(lightning_checkpoint(state), source)
    x = np.random.default_rng(2).random((40, 3, 32, 32), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    fixed = tmp_path / "fixed.ckpt"
    done = subprocess.run([sys.executable, "-m", "bnrepair", "recalibrate", str(source), "--arch", ARCH, "-d",
                           str(tmp_path / "x.npy"), "-o", str(fixed), "--batch-size", "40"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "stored under 'model.'" in line]  # the prefix it took
    assert len(said) == 1 and said[0].startswith("warning: "), done.stderr
    before, after = torch.load(source, weights_only=True), torch.load(fixed, weights_only=True)
    assert list(after) == list(before) and list(after["state_dict"]) == list(before["state_dict"])
    assert after["optimizer_states"][0]["state"][0]["step"] == 120 and after["hyper_parameters"] == {"lr": 0.1}
    want = reference(state, x, len(x))
    for key, value in after["state_dict"].items():
        name = key.removeprefix("model.")
        if name in want:
            scale = want[name.replace("running_mean", "running_var")].sqrt() if "mean" in name else want[name]
            assert ((value.double() - want[name]).abs() / scale).max().item() < 1e-4, key
        else:
            assert torch.equal(value, before["state_dict"][key]), key


def test_a_prefix_that_several_networks_share_is_named_with_prefix(tmp_path):
    """An EMA copy beside the model (``model.`` and ``ema.``): both fit, so the user names one, and only it
    changes; a prefix that fits nothing is a short line with counts."""
    state = broken_state()
    checkpoint = lightning_checkpoint(state)
    checkpoint["state_dict"].update({f"ema.{k}": v.clone() for k, v in state.items()})
    source = tmp_path / "last.ckpt"
    torch.save(checkpoint, source)
    np.save(tmp_path / "x.npy", np.random.default_rng(3).random((16, 3, 32, 32), dtype=np.float32))
    common = ["recalibrate", str(source), "--arch", ARCH, "-d", str(tmp_path / "x.npy"), "-q"]
    several = cli.invoke(app, common)
    assert several.exit_code == 2 and "'ema.', 'model.'" in several.output and "--prefix" in several.output
    assert len(several.output.strip().splitlines()) == 1
    wrong = cli.invoke(app, [*common, "--prefix", "net."])
    assert wrong.exit_code == 2 and "missing key(s)" in wrong.output and len(wrong.output) < 600, wrong.output
    done = cli.invoke(app, [*common, "--prefix", "ema.", "-o", str(tmp_path / "fixed.ckpt")])
    assert done.exit_code == 0, done.output
    after = torch.load(tmp_path / "fixed.ckpt", weights_only=True)["state_dict"]
    changed = {k for k, v in after.items() if not torch.equal(v, checkpoint["state_dict"][k])}
    assert changed and all(k.startswith("ema.features.") and "running_" in k for k in changed), changed


def test_statistics_a_stored_dtype_cannot_hold_are_refused_and_nothing_is_written(tmp_path):
    """An integer running_var is refused before any work; a float16 one whose new variances pass 65504 (float16's
    largest) is refused after the measurement, before anything is written, instead of writing inf."""
    np.save(tmp_path / "x.npy", 2000 * np.random.default_rng(4).random((16, 3, 32, 32), dtype=np.float32))
    common = ["--arch", ARCH, "-d", str(tmp_path / "x.npy"), "-q"]
    integral = broken_state()
    integral["features.1.running_var"] = integral["features.1.running_var"].long()
    torch.save(integral, tmp_path / "integral.pt")
    half = broken_state()
    half = {k: v.half() if k.endswith("running_var") else v for k, v in half.items()}
    torch.save(half, tmp_path / "half.pt")
    for name, message in (("integral.pt", "features.1.running_var is stored as torch.int64, which cannot hold BN"),
                          ("half.pt", "features.1.running_var: the new statistics (largest |value|")):
        done = cli.invoke(app, ["recalibrate", str(tmp_path / name), *common])
        assert done.exit_code == 2 and message in done.output, done.output
        assert len(done.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.pt", "integral.pt", "x.npy"]
