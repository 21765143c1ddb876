"""Bad input to recalibrate / inspect / diagnose: one line naming the file and the problem, exit 2, no
traceback, nothing written and the input untouched; interrupts leave no file behind.

Real damaged files (truncated archives, broken checkpoints, malformed data) made here from the shipped
fixtures, through the command line in-process; signals go to a real ``bnrepair`` process.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bnrepair.cli import app
from fixtures import ARCH_FLAGS, CALIB, HERE, KERAS_STALE, REPO, TORCH_STALE

ROOT, FIXTURES = REPO, HERE
KERAS, TORCH, ARCH = KERAS_STALE, TORCH_STALE, ARCH_FLAGS
cli = CliRunner()


def invoke(args):
    return cli.invoke(app, [str(a) for a in args])


def fails(args, message, folder=None):
    """The command exits 2 with one line holding ``message``, and leaves ``folder`` as it was."""
    before = sorted(p.name for p in folder.iterdir()) if folder else None
    result = invoke(args)
    assert result.exit_code == 2, (args, result.output)
    assert message in result.output, (message, result.output)
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    if folder:
        assert sorted(p.name for p in folder.iterdir()) == before
    return result.output


def cut(source: Path, dest: Path, keep: float) -> Path:
    data = source.read_bytes()
    dest.write_bytes(data[:int(len(data) * keep)])
    return dest


def test_damaged_checkpoints_are_named_as_damaged(tmp_path):
    torn_keras = cut(FIXTURES / "keras" / "healthy.keras", tmp_path / "torn.keras", 0.5)
    torn_torch = cut(TORCH, tmp_path / "torn.pt", 0.5)
    broken_pickle = tmp_path / "pickle.pt"
    with zipfile.ZipFile(TORCH) as src, zipfile.ZipFile(broken_pickle, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, b"\x80\x02\xff" + data[3:] if info.filename.endswith("data.pkl") else data)
    fails(["inspect", torn_keras], "torn.keras: damaged or truncated zip archive")
    fails(["inspect", torn_torch, *ARCH], "torn.pt: damaged or truncated zip archive")
    fails(["inspect", broken_pickle, *ARCH], "pickle.pt: damaged torch file, its pickle cannot be read")


def test_damaged_savedmodel_checkpoint(tmp_path):
    garbage = shutil.copytree(FIXTURES / "savedmodel" / "keras3_export", tmp_path / "garbage")
    (garbage / "variables" / "variables.index").write_bytes(os.urandom(300))
    fails(["inspect", garbage], "garbage: damaged or truncated variables checkpoint")
    # cut at the end: the BN statistics read fine, the last entries fail only when the copy is written
    torn = shutil.copytree(FIXTURES / "savedmodel" / "tf1_slim", tmp_path / "torn")
    data = next((torn / "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[:-40])
    out = tmp_path / "out"
    out.mkdir()
    fails(["recalibrate", torn, "--input", "images", "-d", CALIB, "-o", out / "fixed", "-q"],
          "damaged or truncated variables checkpoint (Read less bytes than requested)", folder=out)


def test_keras_file_is_read_by_its_contents_whatever_its_suffix(tmp_path):
    h5_as_keras = shutil.copy(KERAS, tmp_path / "model.keras")
    keras_as_zip = shutil.copy(FIXTURES / "keras" / "healthy.keras", tmp_path / "model.zip")
    for source in (h5_as_keras, keras_as_zip):
        result = invoke(["recalibrate", source, "-d", CALIB, "-o", tmp_path / f"fixed{source.suffix}", "-q"])
        assert result.exit_code == 0, result.output
    result = invoke(["inspect", tmp_path / "fixed.keras"])
    assert result.exit_code in (0, 1) and "bn1" in result.output, result.output


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_data")
    x = np.random.default_rng(0).random((20, 32, 32, 3), dtype=np.float32)
    np.savez(root / "short_labels.npz", x=x, y=np.arange(7))
    np.savez(root / "onehot.npz", x=x, y=np.eye(4)[np.arange(20) % 4])
    cut_from = root / "whole.npz"
    np.savez(cut_from, x=x)
    cut(cut_from, root / "torn.npz", 0.5)
    np.save(root / "complex.npy", x.astype(np.complex64))
    (root / "junk").mkdir()
    for i in range(4):
        (root / "junk" / f"{i}.png").write_bytes(b"not a png")
    return root


@pytest.mark.parametrize("name, message", [
    ("short_labels.npz", "short_labels.npz: labels 'y' must be one integer class per sample, shape (20,); got "
                         "shape (7,)"),
    ("onehot.npz", "onehot.npz: labels 'y' must be one integer class per sample"),
    ("torn.npz", "torn.npz: cannot read array"),
    ("complex.npy", "complex.npy: expected a real numeric array, got dtype complex64"),
])
def test_malformed_arrays(bad_data, name, message):
    for command in ("recalibrate", "diagnose"):
        fails([command, KERAS, "-d", bad_data / name, "-q"], message, folder=KERAS.parent)


def test_decompression_bomb_is_an_undecodable_image(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    Image.new("1", (20000, 10000)).save(tmp_path / "huge.png")  # 2e8 pixels, past PIL's limit
    out = tmp_path / "out"
    out.mkdir()
    fails(["recalibrate", KERAS, "-d", tmp_path, "-o", out / "fixed.h5"], "huge.png: cannot decode image", folder=out)
    result = invoke(["recalibrate", KERAS, "-d", tmp_path, "--skip-bad", "-o", out / "fixed.h5", "-q"])
    assert result.exit_code == 0 and (out / "fixed.h5").is_file(), result.output


def test_undecodable_images_skipped_to_nothing_name_the_folder(bad_data):
    fails(["recalibrate", KERAS, "-d", bad_data / "junk", "--skip-bad", "-q"],
          "junk: need at least 2 calibration samples, got 0 (4 undecodable image(s) skipped)", folder=KERAS.parent)
    fails(["diagnose", KERAS, "-d", bad_data / "junk", "--skip-bad", "-q"], "junk: need at least 2")


@pytest.mark.parametrize("flags, message", [
    (["--layers", "("], "--layers '(': not a valid regular expression"),
    (["--skip", "["], "--skip '[': not a valid regular expression"),
    (["--device", "tpu"], "--device must be one of auto, cpu, gpu, cuda (gpu and cuda are the same), got 'tpu'"),
    (["--image-size", "0", "0"], "--image-size 0 0: height and width must be between 1 and 16384"),
    (["--image-size", "10000000000", "10000000000"], "height and width must be between 1 and 16384"),
    (["--seed", "-1"], "Invalid value for '--seed'"),
    (["--mode", "eval", "--tol", "nan"], "--tol must be a number >= 0, got nan"),
])
def test_bad_options(tmp_path, flags, message):
    fails(["recalibrate", KERAS, "-d", CALIB, "-o", tmp_path / "out.h5", "-q", *flags], message, folder=tmp_path)


def test_a_report_never_replaces_the_data_or_another_output(tmp_path):
    """--json onto -o replaced the repaired checkpoint, onto -d the calibration data."""
    data = tmp_path / "d.npy"
    np.save(data, np.zeros((4, 32, 32, 3), np.float32))
    before = data.read_bytes()
    fails(["recalibrate", KERAS, "-d", data, "--json", data, "-o", tmp_path / "out.h5", "-q"],
          "d.npy: is also the input of this command", folder=tmp_path)
    assert data.read_bytes() == before
    fails(["recalibrate", KERAS, "-d", CALIB, "-o", tmp_path / "out.h5", "--json", tmp_path / "out.h5", "-q"],
          "out.h5: is also an output of this command", folder=tmp_path)
    fails(["export", KERAS, "-o", tmp_path / "m.onnx", "--json", tmp_path / "m.onnx", "-q"],
          "m.onnx: is also an output of this command", folder=tmp_path)


def test_threshold_nan_cannot_make_the_gate_pass():
    fails(["diagnose", KERAS, "-d", CALIB, "--threshold", "nan", "-q"], "--threshold must be a positive number")


def test_key_for_a_bare_state_dict(tmp_path):
    fails(["recalibrate", TORCH, *ARCH, "--key", "model", "-d", CALIB, "-o", tmp_path / "out.pt"],
          "--key 'model': the file is a bare state_dict", folder=tmp_path)


FEEDS = """
import numpy as np

def batches(shape=(4, 32, 32, 3)):
    return [np.random.default_rng(i).random(shape, dtype=np.float32) for i in range(3)]

def raises():
    raise ValueError("no data today\\n  (a second line)")

def strings():
    return ["a", "b"]

def pairs():
    return [(x, np.zeros(4)) for x in batches()]

def once():
    yield from batches()

def dies():
    yield batches()[0]
    raise RuntimeError("loader died")

def small():
    return batches((4, 8, 8, 3))

def warns():
    import warnings
    warnings.warn("a library's own warning", UserWarning)
    return batches()
"""


@pytest.mark.parametrize("spec, flags, message", [
    ("raises", [], "--data-fn {feeds}:raises: calling it failed: ValueError: no data today (a second line)"),
    ("strings", [], "a batch must be an array or tensor (N, ...), or a tuple or dict of them; got str"),
    ("pairs", ["--input-index", "2"], "--input-index 2: the batches are tuples of 2"),
    ("once", ["--mode", "eval"], "yielded no batches on its second pass: a generator runs only once"),
    ("dies", [], "reading a batch failed: RuntimeError: loader died"),
    ("small", [], "forward pass failed on a calibration batch ((4, 8, 8, 3) float32): ValueError: Input 0"),
])
def test_data_fn_failures(tmp_path, spec, flags, message):
    feeds = tmp_path / "feeds.py"
    feeds.write_text(FEEDS)
    fails(["recalibrate", KERAS, "--data-fn", f"{feeds}:{spec}", "-o", tmp_path / "out.h5", *flags],
          message.format(feeds=feeds), folder=tmp_path)


def test_quiet_silences_library_warnings(tmp_path):
    feeds = tmp_path / "feeds.py"
    feeds.write_text(FEEDS)
    args = ["recalibrate", KERAS, "--data-fn", f"{feeds}:warns", "-o", tmp_path / "out.h5"]
    with pytest.warns(UserWarning, match="a library's own warning"):
        assert invoke(args).exit_code == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet = invoke([*args, "-q"])
    assert quiet.exit_code == 0 and quiet.output == "", quiet.output
    assert not [w for w in caught if "library's own" in str(w.message)]


def test_savedmodel_batch_of_the_wrong_shape(tmp_path):
    feeds = tmp_path / "feeds.py"
    feeds.write_text(FEEDS)
    fails(["recalibrate", FIXTURES / "savedmodel" / "keras3_export", "--data-fn", f"{feeds}:small",
           "-o", tmp_path / "out", "-q"], "forward pass failed on a calibration batch ((4, 8, 8, 3) float32)",
          folder=tmp_path)


def test_reports_never_replace_the_input(tmp_path):
    source = shutil.copy(KERAS, tmp_path / "model.h5")
    saved = Path(source).read_bytes()
    fails(["inspect", source, "--json", source], "model.h5: output would overwrite the input")
    fails(["diagnose", source, "-d", CALIB, "--plot", source], "model.h5: output would overwrite the input")
    fails(["recalibrate", source, "-d", CALIB, "--json", source], "model.h5: output would overwrite the input",
          folder=tmp_path)
    assert Path(source).read_bytes() == saved
    savedmodel = FIXTURES / "savedmodel" / "keras3_export"
    fails(["inspect", savedmodel, "--json", savedmodel / "variables" / "report.json"], "would lie inside the input")
    assert not (savedmodel / "variables" / "report.json").exists()


def test_plot_and_json_folders_are_checked_before_the_work(tmp_path):
    fails(["diagnose", KERAS, "-d", CALIB, "--plot", tmp_path / "missing" / "bn.png"], "does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user writes into read-only folders (root)")
        fails(["recalibrate", KERAS, "-d", CALIB, "-o", locked / "out.h5"], "is not writable", folder=locked)
        fails(["diagnose", KERAS, "-d", CALIB, "--json", locked / "d.json"], "is not writable", folder=locked)
    finally:
        locked.chmod(0o755)


SLOW = """
import os, pathlib, time

import numpy as np


class Slow:
    '''Saved with the checkpoint; with BNREPAIR_TEST_MARKER set, pickling it signals and then takes its time.'''

    def __reduce__(self):
        marker = os.environ.get("BNREPAIR_TEST_MARKER")
        if marker:
            pathlib.Path(marker).touch()
            time.sleep(60)
        return (Slow, ())


def stream():
    for i in range(10_000):
        if i == 2:
            pathlib.Path(os.environ["BNREPAIR_TEST_MARKER"]).touch()
        time.sleep(0.01)
        yield np.random.default_rng(i).random((8, 3, 32, 32), dtype=np.float32)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("phase", ["streaming", "writing"])
def test_interrupt_leaves_nothing(tmp_path, sig, phase):
    (tmp_path / "slow.py").write_text(SLOW)
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "marker"
    if phase == "writing":  # signalled while torch.save writes the temporary file
        sys.path.insert(0, str(tmp_path))
        try:
            from slow import Slow

            torch.save({"model": torch.load(TORCH, weights_only=True), "extra": Slow()}, tmp_path / "ckpt.pt")
        finally:
            sys.path.remove(str(tmp_path))
        args = [tmp_path / "ckpt.pt", "--trust-pickle", "-d", CALIB]
    else:
        args = [TORCH, "--data-fn", f"{tmp_path / 'slow.py'}:stream"]
    env = {**os.environ, "BNREPAIR_TEST_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "bnrepair.cli", "recalibrate", *map(str, args), *ARCH,
                                "-o", str(out / "fixed.pt"), "-q"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), process.communicate()
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + sig, stderr  # 130 for Ctrl-C, 143 for SIGTERM, as shells report them
    assert stderr.strip() == "interrupted; nothing was written"
    assert list(out.iterdir()) == []


def default_signals():
    """In the child: SIGINT and SIGTERM as a terminal would deliver them. A shell's background job inherits
    SIGINT ignored, and Python then never installs its Ctrl-C handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_repaired_checkpoint_keeps_the_input_suffix(tmp_path):
    """A Keras file written as ``x.onnx`` would load nowhere: the format follows the input's name."""
    from typer.testing import CliRunner

    from bnrepair.cli import app

    source = REPO / "fixtures" / "keras" / "stale_ema.h5"
    np.save(tmp_path / "x.npy", np.zeros((4, 32, 32, 3), np.float32))
    result = CliRunner().invoke(app, ["recalibrate", str(source), "-d", str(tmp_path / "x.npy"),
                                      "-o", str(tmp_path / "r.onnx")])
    assert result.exit_code == 2 and "name it *.h5" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_eval_mode_that_does_not_converge_warns_and_exits_3(tmp_path):
    output = tmp_path / "fixed.pt"
    result = invoke(["recalibrate", FIXTURES / "torch" / "stale_ema.pt", *ARCH_FLAGS, "--data", CALIB, "-o", output,
                     "--mode", "eval", "--max-passes", "2", "--tol", "0", "-q"])
    assert result.exit_code == 3, result.output
    assert "warning: eval mode did not converge in 2 passes" in result.output and output.is_file()


def test_a_fifo_as_checkpoint_or_data_is_refused_instead_of_read_forever(tmp_path):
    import os

    fifo = tmp_path / "pipe.npy"
    os.mkfifo(fifo)
    fails(["inspect", fifo], "pipe.npy: not a regular file")
    fails(["recalibrate", KERAS, "-d", fifo, "-o", tmp_path / "out.h5", "-q"],
          "pipe.npy: not a regular file or a folder", folder=tmp_path)


def test_a_report_that_cannot_be_written_takes_the_repaired_checkpoint_with_it(tmp_path, monkeypatch):
    """The command fails, so it keeps nothing: a failing --export already removed the checkpoint, --json did not.
    The fault: a folder appears at the report's path while the run works (the real write then fails)."""
    from bnrepair.report import Report

    original = Report.write_json

    def blocked(report, path):
        Path(path).mkdir()
        return original(report, path)

    monkeypatch.setattr(Report, "write_json", blocked)
    fails(["recalibrate", KERAS, "-d", CALIB, "-o", tmp_path / "out.h5", "--json", tmp_path / "r.json", "-q"],
          "r.json: cannot write (Is a directory); nothing was written")
    assert not (tmp_path / "out.h5").exists()


def test_a_broken_onnxruntime_install_is_one_line_with_the_fix(tmp_path):
    """What a CPU and a GPU build installed over each other, then one removed, leave: a package without its API
    (here an empty onnxruntime/ ahead on the path). One line that says how to mend it, not a traceback."""
    broken = tmp_path / "site" / "onnxruntime"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "bnrepair", "inspect", str(tmp_path / "m.onnx")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("error: onnxruntime is installed but broken")
    assert "pip install '.[onnx]'" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
