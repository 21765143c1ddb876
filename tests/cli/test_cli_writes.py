"""How outputs are written when the system gets in the way: a full disk, the longest legal name, a run killed
before it could clean up, a signal after the output is complete, another user racing for a scratch file.
Real processes, real limits (RLIMIT_FSIZE stands in for a full disk: the writers see the same refused write)."""

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnrepair.cli import app
from fixtures import ARCH_FLAGS, CALIB, HERE, KERAS_STALE, REPO, TORCH_STALE

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def bnrepair(*args, preexec_fn=None, code=None):
    """``bnrepair ARGS`` in a process of its own (``code`` runs first, in place of the plain entry point)."""
    main = code or "from bnrepair.cli import main; main()"
    return subprocess.run([sys.executable, "-c", f"import sys; sys.argv[0] = 'bnrepair'; {main}", *map(str, args)],
                          env=ENV, capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)


def small_files():
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ


@pytest.mark.parametrize("command, source, output, flags", [
    ("recalibrate", KERAS_STALE, "out.h5", []),
    ("recalibrate", HERE / "keras" / "healthy.keras", "out.keras", []),
    ("recalibrate", TORCH_STALE, "out.pt", ARCH_FLAGS),
    ("recalibrate", HERE / "savedmodel" / "keras3_export", "out", []),
    ("fold", HERE / "keras" / "healthy.keras", "out.keras", []),
    ("fold", KERAS_STALE, "out.h5", []),  # HDF5 refused its own write used to crash the process at exit
    ("fold", TORCH_STALE, "out.pt2", ARCH_FLAGS),  # so did torch's archive writer
])
def test_a_refused_write_is_one_line_and_leaves_nothing(tmp_path, command, source, output, flags):
    done = bnrepair(command, source, "-d", CALIB, *flags, "-o", tmp_path / output, "-q", preexec_fn=small_files)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / output}: cannot write (File too large); "
                                                "nothing was written"]
    assert list(tmp_path.iterdir()) == []


def test_the_longest_legal_output_name_is_written(tmp_path):
    output = tmp_path / ("r" * 252 + ".pt")  # 255 bytes: the temporary's name must still fit
    done = CliRunner().invoke(app, ["recalibrate", str(TORCH_STALE), *ARCH_FLAGS, "-d", str(CALIB), "-o", str(output),
                                    "-q"])
    assert done.exit_code == 0, done.output
    state = torch.load(output, weights_only=True)
    assert state.keys() == torch.load(TORCH_STALE, weights_only=True).keys()
    assert list(tmp_path.iterdir()) == [output]


KILLED = """
import os, signal, sys
from pathlib import Path
from bnrepair.writers import atomic_path

with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_later_run_removes_what_a_killed_run_left(tmp_path):
    output = tmp_path / "fixed.pt"
    killed = subprocess.run([sys.executable, "-c", KILLED, str(output)], env=ENV, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".fixed.pt.") and left.name.endswith(".tmp")
    live = tmp_path / f".fixed.pt.{os.getpid()}-abcdefgh.tmp"  # a run still at work: its process lives
    live.write_bytes(b"busy")
    done = CliRunner().invoke(app, ["recalibrate", str(TORCH_STALE), *ARCH_FLAGS, "-d", str(CALIB), "-o", str(output),
                                    "-q"])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "fixed.pt"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_outputs_are_complete_keeps_the_run_a_success(tmp_path, sig):
    """The signal arrives once every output is in place (sent by the process to itself, right then): the run
    ends as it would have, exit 0 and its summary, not killed by the signal with no word."""
    code = ("import os, bnrepair.cli as cli, bnrepair.session as session; done = session.committed; "
            f"session.committed = lambda: (done(), os.kill(os.getpid(), {int(sig)})); cli.main()")
    output, report = tmp_path / "fixed.h5", tmp_path / "r.json"
    done = bnrepair("recalibrate", KERAS_STALE, "-d", CALIB, "-o", output, "--json", report, code=code)
    assert done.returncode == 0, done.stderr
    assert "Recalibrated 3 BN layer(s)" in done.stdout and output.is_file() and report.is_file()


SIGNALLED_IN_WRITE = '''
import os, bnrepair.cli as cli, bnrepair.frameworks.torch.files as files

class Signalling:
    """The output file: at its {after}th write, a signal to this process, handled inside torch's write callback."""
    def __init__(self, path, mode):
        self.file, self.writes = open(path, mode), 0
    def write(self, data):
        self.writes += 1
        if self.writes == {after}:
            os.kill(os.getpid(), {sig})
        return self.file.write(data)
    def __getattr__(self, name):
        return getattr(self.file, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()

files.open = Signalling
cli.main()
'''


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("after", [1, 2, 5, 9])
def test_a_signal_inside_torchs_writer_is_an_interrupt(tmp_path, sig, status, after):
    """torch's zip writer turns an interrupt raised in its write callback into ``RuntimeError: unexpected pos``;
    the command still exits as interrupted, without a traceback, and leaves nothing."""
    out = tmp_path / "out"
    out.mkdir()
    done = bnrepair("recalibrate", TORCH_STALE, *ARCH_FLAGS, "-d", CALIB, "-o", out / "fixed.pt", "-q",
                    code=SIGNALLED_IN_WRITE.format(after=after, sig=int(sig)))
    assert (done.returncode, done.stderr.strip()) == (status, "interrupted; nothing was written")
    assert list(out.iterdir()) == []


def test_a_keras_archive_is_patched_without_a_scratch_file(tmp_path):
    """The weights member is patched in memory: the only file opened for writing beside the output is the
    exclusive temporary that becomes it (a derived scratch name could be a planted link)."""
    written = []

    def watch(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = os.fsdecode(args[0]), args[1], args[2]
            if str(tmp_path) in path and ((mode and set(mode) & set("wax+")) or flags & (os.O_WRONLY | os.O_RDWR)):
                written.append(Path(path).name)

    sys.addaudithook(watch)  # hooks cannot be removed; this one only watches this test's folder
    output = tmp_path / "fixed.keras"
    done = CliRunner().invoke(app, ["recalibrate", str(HERE / "keras" / "healthy.keras"), "-d", str(CALIB), "-o",
                                    str(output), "-q"])
    assert done.exit_code == 0, done.output
    assert written and all(re.fullmatch(rf"\.fixed\.keras\.{os.getpid()}-\w{{8}}\.tmp", name) for name in written), \
        written
    assert list(tmp_path.iterdir()) == [output]


def test_a_savedmodel_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    """The graph is copied, then TensorFlow's SaveV2 is refused the variables (4 MiB of them, past the limit)."""
    import numpy as np
    import tensorflow as tf

    class Ballast(tf.Module):
        def __init__(self):
            super().__init__()
            self.mean, self.var = tf.Variable(tf.zeros([3])), tf.Variable(tf.ones([3]))
            self.kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, 3], seed=[0, 1]))
            self.ballast = tf.Variable(tf.zeros([1 << 20]))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
        def __call__(self, x):
            y = tf.compat.v1.nn.fused_batch_norm(tf.nn.conv2d(x, self.kernel, 1, "SAME"), tf.ones([3]), tf.zeros([3]),
                                                 self.mean, self.var, is_training=False)[0]
            return {"out": y + 0.0 * tf.reduce_sum(self.ballast)}

    module = Ballast()
    tf.saved_model.save(module, str(tmp_path / "model"), signatures=module.__call__)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((16, 8, 8, 3), dtype=np.float32))
    out = tmp_path / "out"
    out.mkdir()

    def one_mib():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    done = bnrepair("recalibrate", tmp_path / "model", "-d", tmp_path / "x.npy", "-o", out / "fixed", "-q",
                    preexec_fn=one_mib)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {out / 'fixed'}: cannot write (File too large); nothing "
                                                "was written"]
    assert list(out.iterdir()) == []


def test_special_files_are_written_into_never_replaced(tmp_path):
    """--json to a FIFO, to a link to /dev/null and through /dev/stdout's kind of link (into /proc/self/fd): the
    bytes go where the path leads, and the FIFO and the links are still what they were (as root, a replaced
    /dev/null would be a regular file for every process)."""
    import json
    import threading

    fifo, null, stdout = tmp_path / "report.fifo", tmp_path / "null.json", tmp_path / "stdout.json"
    os.mkfifo(fifo)
    null.symlink_to("/dev/null")
    stdout.symlink_to("/proc/self/fd/1")
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    for report in (fifo, null):
        done = CliRunner().invoke(app, ["recalibrate", str(KERAS_STALE), "-d", str(CALIB), "-o",
                                        str(tmp_path / f"fixed-{report.name}.h5"), "--json", str(report), "-q"])
        assert done.exit_code == 0, done.output
    reader.join(timeout=60)
    assert received and json.loads(received[0])["layers"]
    through = bnrepair("recalibrate", KERAS_STALE, "-d", CALIB, "-o", tmp_path / "fixed.h5", "--json", stdout, "-q")
    assert through.returncode == 0, through.stderr
    assert json.loads(through.stdout)["layers"]  # it went to the process's standard output
    assert fifo.is_fifo() and null.is_symlink() and stdout.is_symlink()
    assert os.readlink(null) == "/dev/null" and Path("/dev/null").is_char_device()
