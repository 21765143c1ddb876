"""What a new user reads and an attacker's archive meets: help texts, tables at 80 columns, --json -, one line of
change, --skip-bad's warnings, archives whose members are links, escape the archive or inflate past memory."""

import io
import json
import os
import re
import shutil
import stat
import zipfile

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import bnrepair
from bnrepair.cli import app
from bnrepair.untrusted import available_memory
from fixtures import ARCH_FLAGS, CALIB, HERE, KERAS_STALE, TORCH_STALE

cli = CliRunner()


def invoke(*args, columns=None):
    return cli.invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)} if columns else None)


def test_help_shows_defaults_plain_flags_and_the_argument_by_name():
    text = invoke("recalibrate", "--help", columns=200).output
    assert "Usage: bnrepair recalibrate [OPTIONS] CHECKPOINT" in text and "{" not in text
    assert "[default: <stem>.recalibrated<suffix> beside the input]" in text
    assert "Use at most N samples [default: all]." in text
    assert "<bool>" not in text and "--skip-bad " in text
    for command in ("inspect", "diagnose", "fold", "export"):
        assert "<bool>" not in invoke(command, "--help", columns=200).output


LONG = '''
from torch import nn


def build():
    blocks = nn.Sequential()
    for stage in ("stage_one_downsampling", "stage_two_downsampling"):
        blocks.add_module(stage, nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)))
    return blocks
'''


def test_layer_ids_are_never_cut_at_80_columns(tmp_path):
    (tmp_path / "long.py").write_text(LONG)
    torch.manual_seed(0)
    namespace = {}
    exec(LONG, namespace)
    model = namespace["build"]()
    torch.save(model.state_dict(), tmp_path / "long.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 3, 8, 8), dtype=np.float32))
    ids = ["stage_one_downsampling.1", "stage_two_downsampling.1"]
    arch = ["--arch", f"{tmp_path / 'long.py'}:build"]
    for args in (["inspect", tmp_path / "long.pt", *arch],
                 ["recalibrate", tmp_path / "long.pt", *arch, "-d", tmp_path / "x.npy", "-o", tmp_path / "r.pt"],
                 ["diagnose", tmp_path / "long.pt", *arch, "-d", tmp_path / "x.npy"]):
        text = invoke(*args, columns=80).output
        assert all(i in text for i in ids), text  # whole: headers may shorten, ids may not
        assert str(tmp_path / "r.pt") in text or args[0] != "recalibrate"  # a path is never split


def test_recalibrate_and_diagnose_draw_the_same_line(tmp_path):
    fixed, again = tmp_path / "fixed.h5", tmp_path / "again.h5"
    first = invoke("recalibrate", KERAS_STALE, "-d", CALIB, "-o", fixed)
    assert first.exit_code == 0 and "3 layer(s) changed materially" in first.output
    second = invoke("recalibrate", fixed, "-d", CALIB, "-o", again, "--json", tmp_path / "r.json")
    assert second.exit_code == 0 and "nothing to repair: no layer moved beyond 0.5 std" in second.output
    assert not any(layer["share_moved"] > 0.1 for layer in json.loads((tmp_path / "r.json").read_text())["layers"])
    assert invoke("diagnose", fixed, "-d", CALIB, "-q").exit_code == 0  # diagnose: healthy, the same verdict


def test_json_dash_is_standard_output(tmp_path):
    done = invoke("recalibrate", TORCH_STALE, *ARCH_FLAGS, "-d", CALIB, "-o", tmp_path / "r.pt", "--json", "-")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)  # nothing but the JSON on stdout; the table went to stderr
    assert report["output"] == str(tmp_path / "r.pt") and "BatchNorm statistics" in done.stderr
    assert not os.path.exists("-") and sorted(p.name for p in tmp_path.iterdir()) == ["r.pt"]
    inspected = invoke("inspect", TORCH_STALE, *ARCH_FLAGS, "--json", "-")
    assert [layer["decay"] for layer in json.loads(inspected.stdout)["layers"]] == [None] * 3  # not stored


def test_skip_bad_is_named_and_a_lost_class_is_warned_of(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "data" / "cat").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / "cat" / f"{i}.png")
    (tmp_path / "data" / "dog").mkdir()
    (tmp_path / "data" / "dog" / "0.png").write_bytes(b"not a png")
    failed = invoke("recalibrate", KERAS_STALE, "-d", tmp_path / "data", "-o", tmp_path / "r.h5")
    assert failed.exit_code == 2 and "--skip-bad skips undecodable images" in failed.output
    done = invoke("recalibrate", KERAS_STALE, "-d", tmp_path / "data", "-o", tmp_path / "r.h5", "--skip-bad",
                  "--json", tmp_path / "r.json")
    assert done.exit_code == 0, done.output
    assert "warning: no image of class(es) dog was left: the new statistics describe the other classes only" \
        in done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["classes_lost"] == ["dog"]


def test_diagnose_shows_progress_while_it_reads_data():
    class Recorder:
        def __init__(self):
            self.passes = []

        def start_pass(self, index, total, label=None):
            self.passes.append([label, total, 0])

        def advance(self, samples):
            self.passes[-1][2] += samples

        def end_pass(self):
            pass

    progress = Recorder()
    bnrepair.diagnose(KERAS_STALE, CALIB, samples=64, progress=progress)
    assert progress.passes[0] == ["reading data", 64, 64]


def test_numpy_suffixes_are_case_insensitive(tmp_path):
    with open(tmp_path / "x.NPY", "wb") as f:
        np.save(f, np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32))
    assert invoke("recalibrate", KERAS_STALE, "-d", tmp_path / "x.NPY", "-o", tmp_path / "r.h5", "-q").exit_code == 0


def rewritten(source, dest, extra=None):
    """``source``'s members copied to ``dest``, then ``extra(zout)`` adds members of its own."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        if extra:
            extra(zout)
    return dest


def link_member(zout):
    info = zipfile.ZipInfo("assets/passwd")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zout.writestr(info, "/etc/passwd")


def test_archive_members_may_not_be_links_or_leave_the_archive(tmp_path):
    keras_file = HERE / "keras" / "healthy.keras"
    cases = [(rewritten(keras_file, tmp_path / "link.keras", link_member), "archive member assets/passwd is a "
              "symbolic link; refusing to read it"),
             (rewritten(keras_file, tmp_path / "up.keras", lambda z: z.writestr("../../evil.txt", "x")),
              "archive member ../../evil.txt names a path outside the archive"),
             (rewritten(TORCH_STALE, tmp_path / "abs.pt", lambda z: z.writestr("/tmp/evil", "x")),
              "archive member /tmp/evil names a path outside the archive")]
    for path, message in cases:
        done = invoke("inspect", path, *(ARCH_FLAGS if path.suffix == ".pt" else []))
        assert done.exit_code == 2 and done.output.strip() == f"error: {path}: {message}", done.output


def test_an_archive_that_inflates_past_memory_is_refused_before_it_is_read(tmp_path):
    """A few kilobytes whose central directory declares 64 members of 4 GiB each (256 GiB in all)."""
    free = available_memory()
    if free is None or free > 250 << 30:
        pytest.skip("the system states no available memory, or more than the archive declares")
    path = rewritten(TORCH_STALE, tmp_path / "bomb.pt",
                     lambda z: [z.writestr(f"stale_ema/data/big{i}", b"0") for i in range(64)])
    data = bytearray(path.read_bytes())
    start = data.index(b"PK\x01\x02")
    while (at := data.find(b"PK\x01\x02", start)) != -1:
        name = data[at + 46: at + 46 + int.from_bytes(data[at + 28: at + 30], "little")]
        if b"/big" in name:
            data[at + 24: at + 28] = (0xFFFFFFF0).to_bytes(4, "little")  # uncompressed size
        start = at + 4
    path.write_bytes(bytes(data))
    done = invoke("recalibrate", path, *ARCH_FLAGS, "-d", CALIB, "-o", tmp_path / "r.pt")
    assert done.exit_code == 2, done.output
    assert f"{path}: the archive declares 256 GiB once read, more than the" in done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.pt"]
    shutil.rmtree(tmp_path)


def test_a_data_folder_reads_nothing_through_links_out_of_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (data / "loop").symlink_to(data)  # a loop: must not hang
    (data / "inner.png").symlink_to(data / "0.png")  # a link within the folder: read
    assert invoke("recalibrate", KERAS_STALE, "-d", data, "-o", tmp_path / "r.h5", "-q").exit_code == 0
    secret = tmp_path / "secret.png"
    shutil.copy(data / "1.png", secret)
    (data / "leak.png").symlink_to(secret)
    done = invoke("recalibrate", KERAS_STALE, "-d", data, "-o", tmp_path / "s.h5", "-q")
    assert done.exit_code == 2 and f"{data / 'leak.png'}: a symbolic link out of {data}" in done.output
    assert not (tmp_path / "s.h5").exists()


def test_non_finite_weights_are_named_not_blamed_on_the_data(tmp_path):
    """A NaN conv weight made every activation NaN and the data was blamed ("check --preprocess"); a NaN gamma
    passed with exit 0. Both are a damaged checkpoint, named as such before any pass."""
    import keras

    state = torch.load(TORCH_STALE, weights_only=True)
    conv = next(k for k, v in state.items() if k.endswith("weight") and v.dim() == 4)
    state[conv].view(-1)[3] = float("nan")
    torch.save(state, tmp_path / "nan_conv.pt")
    done = invoke("recalibrate", tmp_path / "nan_conv.pt", *ARCH_FLAGS, "-d", CALIB, "-o", tmp_path / "r.pt")
    assert done.exit_code == 2 and done.output.strip() == (
        f"error: {tmp_path / 'nan_conv.pt'}: weight {conv} holds NaN or infinite values: the checkpoint itself is "
        "damaged (a diverged training run?), which recalibrating BN statistics cannot mend")
    model = keras.models.load_model(KERAS_STALE, compile=False)
    bn = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    bn.gamma.assign(np.full(bn.gamma.shape, np.nan, np.float32))
    model.save(tmp_path / "nan_gamma.keras")
    done = invoke("diagnose", tmp_path / "nan_gamma.keras", "-d", CALIB)
    assert done.exit_code == 2 and f"weight {bn.gamma.path} holds NaN or infinite values" in done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan_conv.pt", "nan_gamma.keras"]


def test_keras_refusals_give_the_innermost_reason(tmp_path):
    """Keras wraps what is wrong in "could not be deserialized properly" paragraphs; the first line showed only
    that wrapper."""
    keras_file = HERE / "keras" / "healthy.keras"
    with zipfile.ZipFile(keras_file) as zin, zipfile.ZipFile(tmp_path / "bogus.keras", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                next(layer for layer in config["config"]["layers"]
                     if layer["class_name"] == "BatchNormalization")["config"]["bogus_arg"] = 1
                data = json.dumps(config).encode()
            zout.writestr(info, data)
    done = invoke("inspect", tmp_path / "bogus.keras")
    assert done.exit_code == 2 and done.output.strip() == (
        f"error: {tmp_path / 'bogus.keras'}: Keras could not load the model: Unrecognized keyword arguments "
        "passed to BatchNormalization: {'bogus_arg': 1}")


def test_eval_mode_decodes_each_image_once_when_the_samples_fit(tmp_path):
    """The passes of --mode eval read the decoded samples from memory; --cache-mb 0 decodes on every pass. The
    statistics are the same bytes either way."""
    import sys

    data = tmp_path / "data"
    shutil.copytree(CALIB, data)
    opened = []

    def watch(event, args):
        if event == "open" and isinstance(args[0], str) and args[0].startswith(str(data)) and \
                args[0].endswith(".png"):
            opened.append(args[0])

    sys.addaudithook(watch)  # hooks cannot be removed; this one only counts this test's images
    images = len(list(data.rglob("*.png")))
    counts, states = {}, {}
    for cache in ("1000", "0"):
        opened.clear()
        out = tmp_path / f"r{cache}.pt"
        done = invoke("recalibrate", TORCH_STALE, *ARCH_FLAGS, "-d", data, "--mode", "eval", "--cache-mb", cache,
                      "-o", out, "--json", f"{out}.json", "-q")
        assert done.exit_code == 0, done.output
        counts[cache] = len(opened)
        states[cache] = torch.load(out, weights_only=True)
    passes = json.loads((tmp_path / "r0.pt.json").read_text())["passes"]
    assert passes >= 3 and counts == {"1000": images, "0": images * passes}, (counts, passes)
    assert all(torch.equal(states["1000"][k], states["0"][k]) for k in states["0"])


def test_the_json_report_records_what_repeats_the_run(tmp_path):
    """--json keeps the data, the device and every option of the run, by the API's own keywords: a report from
    last week says how it was made, and its options rebuild the run."""
    report = tmp_path / "r.json"
    done = invoke("recalibrate", KERAS_STALE, "-d", CALIB, "-o", tmp_path / "fixed.h5", "--json", report, "-q",
                  "--image-size", 32, 32, "--preprocess", "tf", "-b", 8, "--seed", 2)
    assert done.exit_code == 0, done.output
    run = json.loads(report.read_text())["run"]
    assert run["data"] == str(CALIB) and run["device"] == "auto"
    assert run["data_options"]["image_size"] == [32, 32] and run["data_options"]["preprocess"] == "tf"
    assert run["data_options"]["batch_size"] == 8 and run["data_options"]["seed"] == 2
    assert run["recalibration"]["mode"] == "train"
    groups = {g.KEYWORD: g for g in (bnrepair.LoadOptions, bnrepair.DataOptions, bnrepair.RecalibrationOptions)}
    bnrepair.recalibrate(KERAS_STALE, run["data"], output=tmp_path / "again.h5",
                         **{key: groups[key].of(**values) for key, values in run.items() if key in groups})
    assert (tmp_path / "again.h5").read_bytes() == (tmp_path / "fixed.h5").read_bytes()  # the same run
    folded = tmp_path / "f.json"
    assert invoke("fold", KERAS_STALE, "-o", tmp_path / "f.keras", "--samples", 16, "--json", folded,
                  "-q").exit_code == 0
    assert json.loads(folded.read_text())["run"]["verify"]["samples"] == 16


def test_a_table_piped_to_a_file_keeps_its_columns(tmp_path):
    """Piped or redirected (no terminal, no COLUMNS), a table is laid out whole: headers uncut, one line a row."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    done = subprocess.run([sys.executable, "-m", "bnrepair", "inspect", str(KERAS_STALE)], capture_output=True,
                          text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr  # the stale fixture's problems found
    rows = [line for line in done.stdout.splitlines() if line.startswith("│")]
    assert "…" not in done.stdout and any("mean min/med/max" in line for line in done.stdout.splitlines())
    assert len(rows) == len(bnrepair.load(KERAS_STALE).graph.bn_layers), done.stdout


def test_a_message_many_layers_share_is_said_once(tmp_path):
    """keras.applications' default decay 0.999 flags every layer alike: one line naming how many, not one each;
    --json keeps a flag per layer."""
    report = tmp_path / "i.json"
    text = invoke("inspect", KERAS_STALE, "--json", report).output
    said = [line for line in text.splitlines() if "needs thousands of steps" in line]
    flagged = [f["layer"] for f in json.loads(report.read_text())["flags"] if f["code"] == "slow_momentum"]
    assert len(flagged) == 3 and said == [f"warning 3 layers ({', '.join(flagged)}): moving-average decay 0.999: "
                                          "needs thousands of steps to forget its initial values"], text


def test_help_names_every_format_the_commands_take():
    assert all(name in invoke("--help", columns=200).output for name in ("ONNX", "TF1"))
    for command in ("recalibrate", "inspect", "diagnose", "fold", "export"):
        text = " ".join(invoke(command, "--help", columns=200).output.split())
        assert "ONNX .onnx or TF1 checkpoint prefix" in text, command


def test_a_torch_archive_that_inflates_as_a_bomb_does_is_refused_before_it_is_read(tmp_path):
    """A state_dict holding 100 MB of zeros, its members deflated: a 100 KB file that asks torch for 100 MB (the
    attack's 3 MB file asked for 3 GB, under the memory left, and torch took it before any check)."""
    state = torch.load(TORCH_STALE, weights_only=True)
    buffer = io.BytesIO()
    torch.save({**state, "ballast": torch.zeros(25_000_000)}, buffer)
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(buffer) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    assert path.stat().st_size < 1 << 20
    done = invoke("recalibrate", path, *ARCH_FLAGS, "-d", CALIB, "-o", tmp_path / "r.pt")
    assert done.exit_code == 2, done.output
    assert re.fullmatch(rf"error: {re.escape(str(path))}: archive member \S+/data/\d+ inflates \d+-fold \(to 0.0931 "
                        r"GiB\), as a decompression bomb does; refusing to read it", done.output.strip()), done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.pt"]


def externally_linked(h5_bytes_or_path, secret):
    """The first BN statistic of an HDF5 file replaced by an external link to ``secret`` (which holds its value)."""
    with h5py.File(h5_bytes_or_path, "r+") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if name.endswith(("moving_mean", "vars/0")) else None)
        value = f[names[0]][()]
        with h5py.File(secret, "w") as s:
            s["x"] = value
        del f[names[0]]
        f[names[0]] = h5py.ExternalLink(str(secret), "x")
        return names[0]


def test_weights_held_in_an_hdf5_external_link_are_refused_naming_the_link(tmp_path):
    h5 = tmp_path / "linked.h5"
    shutil.copyfile(KERAS_STALE, h5)
    h5_link = externally_linked(h5, tmp_path / "secret.h5")
    keras_file = HERE / "keras" / "healthy.keras"
    with zipfile.ZipFile(keras_file) as z:
        weights = io.BytesIO(z.read("model.weights.h5"))
    keras_link = externally_linked(weights, tmp_path / "secret.h5")
    archive = tmp_path / "linked.keras"
    with zipfile.ZipFile(keras_file) as zin, zipfile.ZipFile(archive, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, weights.getvalue() if info.filename == "model.weights.h5" else zin.read(info))
    for path, where, link in [(h5, h5, h5_link), (archive, f"{archive}: model.weights.h5", keras_link)]:
        for command in (["inspect", path], ["recalibrate", path, "-d", CALIB, "-o", tmp_path / f"out{path.suffix}"]):
            done = invoke(*command)
            assert done.exit_code == 2 and done.output.strip() == (
                f"error: {where}: '{link}' is an HDF5 external link to {tmp_path / 'secret.h5'}:x (1 in all); "
                "weights must be stored in the file itself"), done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linked.h5", "linked.keras", "secret.h5"]
