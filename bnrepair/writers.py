"""Output paths and atomic writes: the input is never touched and no half-written file survives."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import BnrepairError, InputError, interrupt_in


def default_output(source: Path, tag: str = "recalibrated") -> Path:
    """``model.h5`` -> ``model.recalibrated.h5`` beside the input (a SavedModel dir gets the tag appended)."""
    source = Path(source)
    if source.is_dir():
        return source.with_name(f"{source.name}.{tag}")
    return source.with_name(f"{source.stem}.{tag}{source.suffix}")


def check_output(source: Path | None, output: Path) -> Path:
    output = Path(output)
    if source is not None and output.resolve() == Path(source).resolve():
        raise BnrepairError(f"{output}: output would overwrite the input; choose another path")
    if source is not None and Path(source).resolve() in output.resolve().parents:  # a SavedModel folder
        raise BnrepairError(f"{output}: output would lie inside the input {source}; choose another path")
    if source is not None and output.resolve() in Path(source).resolve().parents:  # replacing it would delete it
        raise BnrepairError(f"{output}: the input {source} lies inside it; choose another path")
    if not output.parent.exists():
        raise BnrepairError(f"{output}: folder {output.parent} does not exist")
    if output.is_dir() and not (source is not None and Path(source).is_dir()):  # a SavedModel is written as a dir
        raise BnrepairError(f"{output}: is a folder; give the output file's name")
    if not os.access(output.parent, os.W_OK):
        raise BnrepairError(f"{output}: folder {output.parent} is not writable")
    return output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


NAME_MAX = 255  # bytes in one file name on the file systems bnrepair writes to (ext4, xfs, apfs, ntfs)


def scratch_affixes(dest: Path, suffix: str = "") -> dict[str, str]:
    """The ``prefix`` and ``suffix`` of a temporary beside ``dest`` for ``tempfile.mkstemp`` / ``mkdtemp``: hidden,
    tagged with this process's id so a later run can tell a killed run's leftovers (``remove_stale``), and cut so that
    any legal ``dest`` name still gets one (mkstemp adds 8 characters)."""
    pid, tail = f".{os.getpid()}-", f"{suffix}.tmp"
    room = NAME_MAX - 1 - len(pid) - 8 - len(tail.encode())
    stem = dest.name.encode()[:room].decode(errors="ignore")
    return {"prefix": f".{stem}{pid}", "suffix": tail}


def remove_stale(dest: Path, suffix: str = "") -> None:
    """Remove the temporaries of ``dest`` that runs killed before they could clean up (SIGKILL, power loss) left:
    this user's, named by ``scratch_affixes``, whose process is gone. Only on POSIX, where a process can be
    asked whether it lives without being signalled."""
    if os.name != "posix":
        return
    affixes = scratch_affixes(dest, suffix)
    prefix, tail = affixes["prefix"], affixes["suffix"]
    head = prefix[: prefix.rindex(".") + 1]
    with os.scandir(dest.parent) as entries:
        for entry in entries:
            tag = re.fullmatch(r"(\d+)-\w{8}", entry.name[len(head):-len(tail)] if entry.name.endswith(tail) else "")
            if (not entry.name.startswith(head) or tag is None or _alive(int(tag[1]))
                    or entry.stat(follow_symlinks=False).st_uid != os.getuid()):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


_REFUSALS = tuple(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES))
"""what the system says when it refuses a write, as libraries quote it in their own errors"""


def write_error(dest: Path, exc: BaseException) -> BnrepairError | None:
    """A one-line error for a write that the system refused (disk full, quota, file size limit, read-only),
    found also where a library wraps the ``OSError`` (torch's zip writer raises a RuntimeError from it) or
    quotes it (TensorFlow's SaveV2: "...; File too large [Op:SaveV2]")."""
    if not isinstance(exc, Exception) or isinstance(exc, BnrepairError):
        return None
    for cause in (exc, exc.__cause__, exc.__context__):
        if isinstance(cause, shutil.Error) and cause.args and isinstance(cause.args[0], list):
            reason = re.sub(r"^\[Errno \d+\] ([^:]*).*", r"\1", str(cause.args[0][0][-1]))  # copytree's list
        elif isinstance(cause, OSError):
            reason = os.strerror(cause.errno) if cause.errno else str(cause)
        elif cause is not None and (quoted := [r for r in _REFUSALS if r in str(cause)]):
            reason = quoted[0]
        else:
            continue
        return BnrepairError(f"{dest}: cannot write ({reason}); nothing was written")
    return None


@contextmanager
def refused_in_one_line(dest: Path):
    """A write the system refuses, anywhere in the block, becomes ``write_error``'s one line; an interrupt that a
    library turned into its own error is the interrupt again."""
    try:
        yield
    except BaseException as exc:
        error = write_error(dest, exc) or interrupt_in(exc)
        if error is not None and error is not exc:
            raise error from None
        raise


@contextmanager
def atomic_path(dest: Path, suffix: str = ""):
    """Yield a temporary path beside ``dest``; on success it replaces ``dest`` in one step.

    The file gets the permissions a plain ``open(dest, "w")`` would give (mkstemp's are 0600). A ``dest`` that
    exists and is no regular file (``/dev/null``, a FIFO, ``/dev/stdout``'s link to a pipe) is written into,
    never replaced: it is where the user asked the bytes to go.
    """
    dest = Path(dest)
    if special(dest):
        with refused_in_one_line(dest):
            yield dest
        return
    try:
        remove_stale(dest, suffix)
        fd, tmp = tempfile.mkstemp(**scratch_affixes(dest, suffix), dir=dest.parent)
    except OSError as exc:
        raise BnrepairError(f"{dest}: cannot write in {dest.parent} ({exc.strerror})") from None
    os.close(fd)
    with refused_in_one_line(dest):
        try:
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


@contextmanager
def scratch_folder(dest: Path, suffix: str = ""):
    """A temporary folder beside ``dest`` (named by ``scratch_affixes``) for output built of several files, which
    the caller renames into place; whatever is left in it goes on the way out, and a refused write is one line."""
    dest = Path(dest)
    remove_stale(dest, suffix)
    folder = Path(tempfile.mkdtemp(**scratch_affixes(dest, suffix), dir=dest.parent))
    try:
        with refused_in_one_line(dest):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def replace_folder(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``; an existing ``dest`` folder is set aside first and removed
    after (a folder cannot be replaced in one step)."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    with scratch_folder(dest, ".old") as aside:
        os.replace(dest, aside / dest.name)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(aside / dest.name, dest)
            raise


@contextmanager
def removed_on_failure(path: Path | None):
    """Steps after ``path`` is in place (its digest, an export): if one fails or is interrupted, ``path`` goes
    too, so the run leaves nothing behind, as one that stopped before writing would. A path that is no file is
    a checkpoint prefix (TF1): its files go, and the folder's ``checkpoint`` state file if it names that prefix
    alone (the writer added it to a folder that had none)."""
    try:
        yield
    except BaseException:
        if path is not None and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path is not None and not path.exists():
            for part in path.parent.glob(glob.escape(path.name) + ".*"):
                part.unlink(missing_ok=True)
            state = path.parent / "checkpoint"
            if state.is_file() and set(re.findall(r'"([^"]*)"', state.read_text(errors="replace"))) == {path.name}:
                state.unlink()
        elif path is not None and not special(path):
            path.unlink(missing_ok=True)
        raise


def special(path: Path) -> bool:
    """Whether ``path`` is something to write into rather than replace: it exists (links followed) as other than
    a regular file or a folder (a device, a FIFO, a socket), or it links into ``/dev`` or ``/proc`` (``/dev/stdout``
    is a link to ``/proc/self/fd/1``, whatever that file descriptor is)."""
    if path.is_symlink() and os.path.realpath(path).startswith(("/dev/", "/proc/")):
        return True
    return path.exists() and not path.is_file() and not path.is_dir()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def storable(value, dtype, what: str) -> np.ndarray:
    """``value`` in the dtype the checkpoint stores it in, refused where that dtype cannot hold it: a float16
    variance beyond 65504 would turn inf, an integer or boolean one truncate."""
    dtype = np.dtype(dtype)
    value = np.asarray(value, np.float64)
    if dtype.kind != "f":
        raise InputError(f"{what} is stored as {dtype}, which cannot hold BN statistics")
    with np.errstate(over="ignore"):
        cast = value.astype(dtype)
    if not np.isfinite(cast).all():
        raise InputError(f"{what}: the new statistics (largest |value| {np.max(np.abs(value)):.3g}) overflow its "
                         f"stored {dtype}")
    return cast
