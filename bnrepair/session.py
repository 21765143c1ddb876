"""One command's life as a process: a user mistake as one line and exit 2, SIGTERM as an interrupt, the
outputs committed before the summary, the torchrun process group joined and left around the run."""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import warnings
from pathlib import Path
from typing import Optional

import typer

from .console import err, print_error, show_warning
from .errors import BnrepairError, Terminated


def user_errors(command):
    """Turn a user mistake into one line on stderr and exit 2; an interrupt into exit 130 (Ctrl-C) or 143 (SIGTERM).

    SIGTERM (``kill``, ``timeout``, a job scheduler) interrupts like Ctrl-C, so temporary files are
    removed on the way out instead of being left behind by the default handler. With ``--quiet`` the
    libraries' own warnings (zipfile, Keras, torch, Pillow, numpy) are silenced too: errors only.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        in_main = threading.current_thread() is threading.main_thread()  # where signal handlers are set
        previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
        try:
            with warnings.catch_warnings():
                if own_process:  # the command's own process: warnings as one line (an embedding host keeps its own)
                    warnings.showwarning = show_warning
                if kwargs.get("quiet"):
                    warnings.simplefilter("ignore")
                return command(*args, **kwargs)
        except BnrepairError as exc:
            if not getattr(exc, "said_by_rank_0", False):  # under torchrun, an error every rank shares
                print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            err.print("interrupted; nothing was written")
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
        finally:
            if previous is not None and signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:  # not committed
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _terminate(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def ranks(timeout: float):
    """Under torchrun: this process's ``distributed.Group`` (joined here, left at the end), else None. Rank 0
    reports and writes; the other ranks print errors only."""
    from .distributed import Group, NoAnswer, launched

    if not launched():
        yield None
        return
    group, everyone_here = Group.join(timeout), True
    try:
        yield group
    except (NoAnswer, KeyboardInterrupt):  # a rank is gone or going: nobody to wait for
        everyone_here = False
        raise
    finally:
        group.close(everyone_here)


def single_process(command: str) -> None:
    from .distributed import launched

    if launched():
        raise BnrepairError(f"bnrepair {command} runs in one process: start it without torchrun (only recalibrate "
                            "and diagnose share their work across ranks)")


def write_report(report, json_path: Optional[Path], *written: Optional[str]) -> None:
    """The --json report, last; where it cannot be written, the outputs this run ``written`` go too, so a
    failed command leaves nothing (as one that stopped before writing would). Then the run is committed."""
    from contextlib import ExitStack

    from .writers import removed_on_failure

    if not json_path:
        committed()
        return
    with ExitStack() as stack:
        for path in written:
            stack.enter_context(removed_on_failure(Path(path) if path else None))
        report.write_json(json_path)  # a refused write is a one-line error (writers.write_error)
    committed()


own_process = False
"""set by ``cli.main``: the process is the bnrepair command, its signal dispositions are ours"""


def committed() -> None:
    """Every output is in place. An interrupt from here on would only misreport the run (the wrapper would say
    nothing was written, a default handler would kill the process by the signal with the outputs complete), so
    the command ignores SIGINT and SIGTERM from here, prints its summary and exits with its own status. (Ignored,
    not blocked: a signal blocked in this thread is delivered to one of the frameworks' threads instead.)"""
    if own_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
