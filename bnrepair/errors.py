"""Errors that are the user's to fix: the CLI prints them on one line, without a traceback; and interrupts."""

from __future__ import annotations


class BnrepairError(Exception):
    """Bad input (file, data, option): the message names what is wrong and where."""

    exit_code = 2


class InputError(BnrepairError):
    """A checkpoint or data file that cannot be used as given."""


def first_line(exc: BaseException) -> str:
    """A library's error in one line (our messages are one line): its first line, or its type when empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class NoBatchNorm(InputError):
    """The model has no BN layer: a bad checkpoint for the CLI, nothing to do for a model passed in memory."""


def require(modules: tuple[str, ...], purpose: str, extra: str) -> None:
    """Refuse, before any work, what needs an optional dependency that is not installed. bnrepair is installed
    from a checkout, so the hint names the extra of this project, not a package index."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise BnrepairError(f"{purpose} needs {' and '.join(missing)}, not installed: from the bnrepair checkout, "
                            f"pip install '.[{extra}]'")


class VerificationError(BnrepairError):
    """The folded or exported model does not compute what the source computes."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a job scheduler), raised like Ctrl-C's interrupt so the same clean-up runs;
    the command then exits 143 (128 + 15) where Ctrl-C exits 130."""


def interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The interrupt behind ``exc``: itself, or one a library turned into its own error while writing (torch's zip
    writer, signalled inside its write callback, fails with ``RuntimeError: unexpected pos`` from it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
