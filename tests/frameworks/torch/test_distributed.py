"""Recalibration across processes: real torchrun, two CPU ranks over gloo, against one process on the same data.

torchrun starts the ranks as users do (``--standalone`` picks a free port, so runs never collide). Every case
compares with an independent result: the same command in one process, or a float64 reference computed here.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bnrepair
from fixtures import make_torch, synthetic

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("ddp_script", Path(__file__).with_name("ddp_script.py"))
ddp_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_script)
ARCH = f"{make_torch.ARCH}:build"
CALIB = synthetic.folder("a", "calib")
# (fixture, flags it needs): a state_dict with --arch, a pickled module, a TorchScript archive
FIXTURES = [("stale_ema.pt", ["--arch", ARCH]), ("frozen_bn.pt", ["--trust-pickle"]),
            ("homogeneous.pt", ["--trust-code"])]
LIMIT = 600  # seconds: only so that a hang fails the test instead of the CI run


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=LIMIT)


def statistics(path: Path, flags: list[str]) -> dict[str, np.ndarray]:
    module = bnrepair.load(path, arch=ARCH if "--arch" in flags else None, trust_pickle="--trust-pickle" in flags,
                           trust_code="--trust-code" in flags).module
    return {k: v.double().numpy() for k, v in module.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name,flags", FIXTURES, ids=[f for f, _ in FIXTURES])
def test_two_ranks_write_what_one_process_writes(tmp_path, name, flags, mode):
    """Odd batches (7 samples: 37 batches, uneven between the ranks) so the sharing is really exercised."""
    common = ["--data", str(CALIB), "--mode", mode, "--batch-size", "7", *flags]
    one = tmp_path / "out.pt"
    bnrepair.recalibrate(make_torch.OUT / name, str(CALIB), output=one, mode=mode, batch_size=7,
                         arch=ARCH if "--arch" in flags else None, trust_pickle="--trust-pickle" in flags,
                         trust_code="--trust-code" in flags)
    out = tmp_path / "two"
    out.mkdir()
    run = torchrun("-m", "bnrepair", "recalibrate", str(make_torch.OUT / name), *common, "-o", str(out / "out.pt"),
                   "--json", str(out / "report.json"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["out.pt", "report.json"]  # one output, no temporaries
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["samples"] == len(list(CALIB.rglob("*.png")))
    expected, got = statistics(one, flags), statistics(out / "out.pt", flags)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert run.stdout.count("Recalibrated") == 1  # rank 0 reports, rank 1 is silent


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ddp_script_ranks_with_halves_get_the_whole_sets_statistics(tmp_path, mode):
    """Each rank passes its own (uneven) part of the data, as a DDP script does; both end with the statistics
    of the whole set in one process, and with the same ones."""
    run = torchrun(str(Path(ddp_script.__file__)), str(tmp_path), mode)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1)]
    x = ddp_script.data()
    whole = ddp_script.model()
    batches = [part[i:i + ddp_script.BATCH] for part in (x[:ddp_script.SPLIT], x[ddp_script.SPLIT:])
               for i in range(0, len(part), ddp_script.BATCH)]  # the ranks' own batches, one after the other
    bnrepair.recalibrate(whole, batches, mode=mode, process_group=False)
    for r, got in enumerate(ranks):
        assert int(got["samples"]) == ddp_script.SAMPLES and int(got["world_size"]) == 2
        for name, m in whole.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                np.testing.assert_allclose(got[f"{name}.mean"], m.running_mean.double().numpy(), rtol=1e-5,
                                           atol=1e-6, err_msg=f"rank {r} {name}")
                np.testing.assert_allclose(got[f"{name}.var"], m.running_var.double().numpy(), rtol=1e-5,
                                           err_msg=f"rank {r} {name}")
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])  # merged alike on every rank: bit-identical
    # independently of bnrepair: the first BN's input does not depend on any BN, so its statistics are the
    # float64 population moments of the first conv's output over all 50 samples
    with torch.no_grad():
        first = ddp_script.model()[0].double()(x.double())
    flat = first.transpose(0, 1).reshape(first.shape[1], -1).numpy()
    np.testing.assert_allclose(ranks[0]["1.mean"], flat.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ranks[0]["1.var"], flat.var(axis=1, ddof=1), rtol=1e-5)


def broken_folder(tmp_path: Path, batch_size: int, on_rank: int) -> tuple[Path, int, Path]:
    """The calibration images plus one undecodable file, and a seed that puts it in ``on_rank``'s batches
    (batch i goes to rank i mod 2)."""
    root = tmp_path / "calib"
    shutil.copytree(CALIB, root)
    broken = root / "2_checker" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    files = sorted(root.rglob("*.png"))
    for seed in range(100):
        position = int(np.flatnonzero(np.random.default_rng(seed).permutation(len(files)) == files.index(broken))[0])
        if position // batch_size % 2 == on_rank:
            return root, seed, broken
    raise AssertionError("no seed puts the broken image on that rank")


def test_a_failing_rank_ends_every_rank_with_its_error_and_nothing_written(tmp_path):
    data, seed, broken = broken_folder(tmp_path, 16, on_rank=1)
    out = tmp_path / "out"
    out.mkdir()
    run = torchrun("-m", "bnrepair", "recalibrate", str(make_torch.OUT / "stale_ema.pt"), "--arch", ARCH, "--data",
                   str(data), "--seed", str(seed), "-b", "16", "-o", str(out / "fixed.pt"))
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: rank 1: {broken}: cannot decode image"), \
        run.stderr[-3000:]  # said once, by rank 0
    assert f'File "{ROOT / "bnrepair"}' not in run.stderr  # torchrun prints its own traceback; none of ours
    assert list(out.iterdir()) == []


def test_a_rank_that_never_answers_is_named_within_the_timeout(tmp_path):
    run = torchrun("-m", "bnrepair", "recalibrate", str(make_torch.OUT / "stale_ema.pt"), "--arch", ARCH,
                   "--data-fn", f"{Path(__file__).with_name('hanging_data.py')}:batches", "--dist-timeout", "5",
                   "-o", str(tmp_path / "fixed.pt"))
    assert "error: rank(s) 1 did not answer rank 0 within 5 s (--dist-timeout)" in run.stderr, run.stderr[-3000:]
    assert run.returncode != 0 and not (tmp_path / "fixed.pt").exists()


def test_diagnose_under_torchrun_reports_what_one_process_does(tmp_path):
    common = ["diagnose", str(make_torch.OUT / "stale_ema.pt"), "--arch", ARCH, "--data", str(CALIB), "-b", "10"]
    one = subprocess.run([sys.executable, "-m", "bnrepair", *common, "--json", str(tmp_path / "one.json")],
                         capture_output=True, text=True, cwd=ROOT, timeout=LIMIT)
    two = torchrun("-m", "bnrepair", *common, "--json", str(tmp_path / "two.json"))
    assert one.returncode == two.returncode == 1, two.stderr[-3000:]  # problems found, alike
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["samples"] == b["samples"] == 256
    assert [v["cause"] for v in a["verdicts"]] == [v["cause"] for v in b["verdicts"]]
    for x, y in zip(a["layers"], b["layers"]):
        assert x["id"] == y["id"]
        np.testing.assert_allclose(y["mean_shift_max"], x["mean_shift_max"], rtol=1e-5)
    assert a["outputs"]["accuracy"] == b["outputs"]["accuracy"]
    np.testing.assert_allclose(b["outputs"]["agreement_inference_vs_training"],
                               a["outputs"]["agreement_inference_vs_training"])


def test_commands_that_run_in_one_process_refuse_torchrun(tmp_path):
    run = torchrun("-m", "bnrepair", "fold", str(make_torch.OUT / "stale_ema.pt"), "--arch", ARCH, "-o",
                   str(tmp_path / "f.pt2"))
    assert "error: bnrepair fold runs in one process: start it without torchrun" in run.stderr
    assert run.returncode != 0 and list(tmp_path.iterdir()) == []
