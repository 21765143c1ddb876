"""torch checkpoint files: kinds told apart by contents, only BN buffers rewritten, untrusted code never run.

Real files written by ``torch.save`` / ``torch.jit.save`` (the shipped fixtures and variants made here),
recalibrated through the command line in-process; outputs are read back and compared entry by entry,
bit for bit.
"""

import argparse
import hashlib
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import bnrepair
from bnrepair.cli import app
from fixtures import REPO

ROOT = REPO
if str(ROOT) not in sys.path:  # the pickled fixture's classes are fixtures.torch.arch.*
    sys.path.insert(0, str(ROOT))

FILES = ROOT / "fixtures" / "torch"
ARCH = f"{FILES / 'arch.py'}:build"
BN_STATS = ("running_mean", "running_var")
cli = CliRunner()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "x.npy"
    np.save(path, np.random.default_rng(0).random((40, 3, 32, 32), dtype=np.float32))
    return path


def recalibrate(source, calib, output, *flags):
    result = cli.invoke(app, ["recalibrate", str(source), "--data", str(calib), "-o", str(output), "--quiet", *flags])
    assert result.exit_code == 0, result.output
    return output


def read(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def identical(a, b) -> bool:
    """Same structure, same types, tensors equal bit for bit with the same dtype and shape."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def split_state(state):
    """(BN statistics, everything else) of a state_dict."""
    bn = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in BN_STATS}
    return bn, {k: v for k, v in state.items() if k not in bn}


def assert_only_bn_changed(before, after, prefix=""):
    bn_before, rest_before = split_state(before)
    bn_after, rest_after = split_state(after)
    assert identical(rest_before, rest_after)
    assert list(bn_before) == list(bn_after) and all(k.startswith(prefix) for k in after)
    for key in bn_before:
        assert bn_after[key].dtype == bn_before[key].dtype
        assert not torch.equal(bn_after[key], bn_before[key]), key


def test_checkpoint_dict_keeps_every_other_entry_bit_identical(tmp_path, calib):
    source = FILES / "never_updated.pt"
    output = recalibrate(source, calib, tmp_path / "out.pt", "--arch", ARCH)
    before, after = read(source), read(output)
    assert list(before) == list(after) == ["model", "optimizer", "epoch", "config"]
    assert identical(before["optimizer"], after["optimizer"]) and before["optimizer"]["state"]
    assert identical({k: before[k] for k in ("epoch", "config")}, {k: after[k] for k in ("epoch", "config")})
    assert_only_bn_changed(before["model"], after["model"], prefix="module.")


def test_bare_state_dict_default_output_and_untouched_input(tmp_path, calib):
    source = tmp_path / "stale_ema.pt"
    shutil.copyfile(FILES / "stale_ema.pt", source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    result = cli.invoke(app, ["recalibrate", str(source), "--data", str(calib), "--arch", ARCH, "-q"])
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    output = tmp_path / "stale_ema.recalibrated.pt"
    assert_only_bn_changed(read(source), read(output))
    module = bnrepair.load(output, arch=ARCH).module  # loads strictly back into the architecture
    assert module.features[1].running_var.min() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale_ema.pt", "stale_ema.recalibrated.pt"]


def test_prefixes_dtype_and_legacy_format_are_kept(tmp_path, calib):
    state = read(FILES / "stale_ema.pt")
    half = {f"module._orig_mod.{k}": (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    source = tmp_path / "legacy.pt"
    torch.save(half, source, _use_new_zipfile_serialization=False)
    output = recalibrate(source, calib, tmp_path / "out.pt", "--arch", ARCH)
    assert not zipfile.is_zipfile(output)
    after = read(output)
    assert all(v.dtype == torch.float16 for k, v in after.items() if "num_batches" not in k)
    assert_only_bn_changed(half, after, prefix="module._orig_mod.")


def test_key_chooses_among_several_state_dicts(tmp_path, calib):
    state = read(FILES / "stale_ema.pt")
    source = tmp_path / "two.pt"
    torch.save({"model": state, "ema": {k: v.clone() for k, v in state.items()}, "step": 10}, source)
    refused = cli.invoke(app, ["recalibrate", str(source), "--data", str(calib), "--arch", ARCH,
                               "-o", str(tmp_path / "out.pt")])
    assert refused.exit_code == 2
    assert "several entries hold a state_dict (model, ema); choose one with --key" in refused.output
    output = recalibrate(source, calib, tmp_path / "out.pt", "--arch", ARCH, "--key", "ema")
    before, after = read(source), read(output)
    assert identical(before["model"], after["model"]) and after["step"] == 10
    assert_only_bn_changed(before["ema"], after["ema"])


def test_safe_global_allows_a_plain_data_global(tmp_path, calib):
    source = tmp_path / "args.pt"
    torch.save({"state_dict": read(FILES / "stale_ema.pt"), "args": argparse.Namespace(lr=0.1, tag="x")}, source)
    refused = cli.invoke(app, ["recalibrate", str(source), "--data", str(calib), "--arch", ARCH,
                               "-o", str(tmp_path / "out.pt")])
    assert refused.exit_code == 2
    assert "argparse.Namespace" in refused.output and "--safe-global" in refused.output
    output = recalibrate(source, calib, tmp_path / "out.pt", "--arch", ARCH, "--safe-global", "argparse.Namespace")
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert read(output)["args"] == argparse.Namespace(lr=0.1, tag="x")


class Payload:
    """Unpickling this creates ``marker``: the proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_code_never_runs_without_trust_pickle(tmp_path, calib):
    marker = tmp_path / "pwned"
    source = tmp_path / "payload.pt"
    torch.save({"model": read(FILES / "stale_ema.pt"), "extra": Payload(marker)}, source)
    out = tmp_path / "out"
    out.mkdir()
    result = cli.invoke(app, ["recalibrate", str(source), "--data", str(calib), "--arch", ARCH,
                              "-o", str(out / "x.pt")])
    assert result.exit_code == 2 and "--trust-pickle" in result.output and "open" in result.output
    assert not marker.exists() and not any(out.iterdir())
    torch.load(source, weights_only=False)  # the payload is real: trusting the file runs it
    assert marker.exists()


def test_full_pickled_module_needs_trust_pickle(tmp_path, calib):
    source = FILES / "frozen_bn.pt"
    refused = cli.invoke(app, ["recalibrate", str(source), "--data", str(calib), "-o", str(tmp_path / "out.pt")])
    assert refused.exit_code == 2 and "full pickled module" in refused.output and "--trust-pickle" in refused.output
    assert not (tmp_path / "out.pt").exists()
    output = recalibrate(source, calib, tmp_path / "out.pt", "--trust-pickle")
    before, after = torch.load(source, weights_only=False), torch.load(output, weights_only=False)
    assert type(after) is type(before)
    assert_only_bn_changed(before.state_dict(), after.state_dict())


def test_torchscript_needs_trust_code_and_keeps_extra_files(tmp_path, calib):
    source = FILES / "homogeneous.pt"
    refused = cli.invoke(app, ["recalibrate", str(source), "--data", str(calib), "-o", str(tmp_path / "out.pt")])
    assert refused.exit_code == 2 and "--trust-code" in refused.output
    assert not (tmp_path / "out.pt").exists()
    output = recalibrate(source, calib, tmp_path / "out.pt", "--trust-code")
    extra_in, extra_out = {"meta.json": ""}, {"meta.json": ""}
    with pytest.warns((DeprecationWarning, FutureWarning)):  # torch 2.14 says FutureWarning
        before = torch.jit.load(str(source), _extra_files=extra_in)
        after = torch.jit.load(str(output), _extra_files=extra_out)
    assert extra_out["meta.json"] == extra_in["meta.json"] and b"homogeneous" in extra_in["meta.json"]
    assert after.code == before.code
    assert_only_bn_changed(before.state_dict(), after.state_dict())


def test_data_fn_batches_as_dicts_and_tuples(tmp_path):
    (tmp_path / "feed.py").write_text(
        "import torch\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.rand(48, 3, 32, 32, generator=g)\n"
        "def as_dicts():\n    return [{'x': x[i:i + 16]} for i in range(0, 48, 16)]\n"
        "def as_tuples():\n    return [(torch.zeros(16), x[i:i + 16]) for i in range(0, 48, 16)]\n")
    outputs = []
    for spec, extra in (("as_dicts", []), ("as_tuples", ["--input-index", "1"])):
        result = cli.invoke(app, ["recalibrate", str(FILES / "stale_ema.pt"), "--arch", ARCH, "--data-fn",
                                  f"{tmp_path / 'feed.py'}:{spec}", "-o", str(tmp_path / f"{spec}.pt"), "-q", *extra])
        assert result.exit_code == 0, result.output
        outputs.append(read(tmp_path / f"{spec}.pt"))
    assert identical(*outputs)


def test_errors_are_one_line_exit_2_and_write_nothing(tmp_path, calib):
    state = read(FILES / "stale_ema.pt")
    misfit = dict(state)
    misfit["features.99.weight"] = misfit.pop("features.0.weight")
    torch.save(misfit, tmp_path / "misfit.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((FILES / "stale_ema.pt").read_bytes()[:3000])
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "noweights.pt")
    np.save(tmp_path / "bytes.npy", np.zeros((4, 3, 32, 32), np.uint8))
    (tmp_path / "versioned.py").write_text(  # as torchvision's MNASNet does when _metadata has no version
        "import torch\n"
        "class Versioned(torch.nn.BatchNorm2d):\n"
        "    def _load_from_state_dict(self, state, prefix, metadata, *args):\n"
        "        raise ValueError('MNASNet checkpoints before version 2 are not supported')\n"
        "def build():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), Versioned(4))\n")
    torch.save({"0.weight": torch.zeros(4, 3, 3, 3), "0.bias": torch.zeros(4), "1.weight": torch.ones(4),
                "1.bias": torch.zeros(4), "1.running_mean": torch.zeros(4), "1.running_var": torch.ones(4),
                "1.num_batches_tracked": torch.tensor(0)}, tmp_path / "versioned.pt")
    stale = str(FILES / "stale_ema.pt")
    cases = [
        ([str(tmp_path / "versioned.pt"), "--arch", f"{tmp_path / 'versioned.py'}:build"],
         "does not fit --arch"),
        ([stale], "a state_dict holds weights only; give --arch"),
        ([str(tmp_path / "misfit.pt"), "--arch", ARCH],
         "1 missing key(s) (features.0.weight), 1 unexpected (features.99.weight)"),
        ([stale, "--arch", ARCH, "--arch-kwargs", "{bad"], "--arch-kwargs: not valid JSON"),
        ([stale, "--arch", f"{FILES / 'nothere.py'}:build"], "nothere.py: no such file"),
        ([stale, "--arch", ARCH, "--arch-kwargs", '{"hidden": 16}'], "does not fit --arch"),
        ([str(truncated), "--arch", ARCH], "truncated.pt"),
        ([str(tmp_path / "noweights.pt"), "--arch", ARCH], "no entry of this checkpoint dict holds a state_dict"),
        ([str(FILES / "never_updated.pt"), "--arch", ARCH, "--key", "optimizer"], "--key 'optimizer' does not hold"),
        ([stale, "--arch", ARCH, "--safe-global", "nowhere.Thing"], "--safe-global nowhere.Thing: cannot import"),
        ([stale, "--arch", ARCH, "--device", "tpu"], "--device must be one of auto, cpu, gpu, cuda"),
        ([stale, "--arch", ARCH, "--data", str(tmp_path / "bytes.npy")],
         "forward pass failed on a calibration batch ((4, 3, 32, 32) uint8)"),
    ]
    if not torch.cuda.is_available():
        cases.append(([stale, "--arch", ARCH, "--device", "cuda"], "torch sees no CUDA device"))
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        data = [] if "--data" in args else ["--data", str(calib)]
        result = cli.invoke(app, ["recalibrate", *args, *data, "-o", str(tmp_path / "out.pt")])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (message, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_arch_modules_beside_the_user_import_from_the_installed_command(tmp_path):
    """The documented `--arch mynet:build` from the folder holding mynet.py: the console script's import path
    did not hold the current folder (python -m's does)."""
    import subprocess

    (tmp_path / "mynet.py").write_text("import torch\n"
                                       "def build():\n"
                                       "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), "
                                       "torch.nn.BatchNorm2d(4))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import mynet

        torch.save(mynet.build().state_dict(), tmp_path / "m.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynet", None)
    command = Path(sys.executable).with_name("bnrepair")
    done = subprocess.run([str(command), "inspect", "m.pt", "--arch", "mynet:build", "--json", "r.json", "-q"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert "cannot import" not in done.stderr, done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["layers"][0]["id"] == "1"
