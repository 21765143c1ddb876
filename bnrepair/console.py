"""What the ``bnrepair`` command shows on a terminal: one-line errors, help as a shell user reads it, the
progress bar. ``cli.py`` declares the commands; this is their look."""

from __future__ import annotations

import os
import re
import time

import rich.markup
import typer
from rich.console import Console, ConsoleDimensions

from .terminal import shown

PIPE_WIDTH = 1000
"""the width a pipe or a file is laid out to: wide enough that no table row wraps or column is cut"""


class PipeWideConsole(Console):
    """A console that lays tables out to the terminal's width, and to ``PIPE_WIDTH`` where its output goes to a
    pipe or a file (rich would take 80 there, cutting headers and wrapping every row); ``COLUMNS`` still rules."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or "COLUMNS" in os.environ:
            return size
        return ConsoleDimensions(PIPE_WIDTH, size.height)


# Lines are never hard-wrapped (the terminal wraps them; a pipe or a log gets each whole, paths unbroken);
# tables are still laid out to the width.
err = PipeWideConsole(stderr=True, soft_wrap=True)
out = PipeWideConsole(highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    """One line on stderr, even when the message quotes an exception's multi-line text; plain text, not
    markup (a path may hold [brackets])."""
    line = re.sub(r"\s*\n\s*", " ", message.strip())
    err.print(f"[bold red]error:[/] {shown(line)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {shown(message)}", highlight=False, soft_wrap=True)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command: a library's or bnrepair's warning as one ``warning:`` line,
    without the source line Python adds."""
    warn(" ".join(str(message).split()))


class OneLineUsageErrors(typer.core.TyperGroup):
    """A mistake in a command's options or arguments (out of range, unknown, missing) is bad input like any
    other: one line on stderr and exit 2, instead of click's usage text in a panel."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except typer.BadParameter.__base__ as exc:  # click's UsageError (newer typer vendors click)
            print_error(exc.format_message())
            raise typer.Exit(exc.exit_code) from None

    def get_help_option(self, ctx):
        return flag_metavar(super().get_help_option(ctx))

    def get_params(self, ctx):
        return [flag_metavar(p) if getattr(p, "is_flag", False) else p for p in super().get_params(ctx)]


class Command(typer.core.TyperCommand):
    """Help as a shell user reads it: the argument named in capitals in the usage line (typer writes
    ``{checkpoint}``), no metavar after a flag (typer writes ``<bool>``), and help texts taken as text, so a
    ``[default: ...]`` in them is shown rather than dropped as a markup tag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None and getattr(param, "is_flag", False):
                flag_metavar(param)
            elif param.metavar is None and param.param_type_name == "argument":
                param.metavar = param.name.upper()
            if getattr(param, "help", None):
                param.help = rich.markup.escape(param.help)

    def collect_usage_pieces(self, ctx):
        return [piece.strip("{}") for piece in super().collect_usage_pieces(ctx)]

    def get_help_option(self, ctx):
        return flag_metavar(super().get_help_option(ctx))


def flag_metavar(option):
    if option is not None:
        option.metavar = ""
    return option


class RichProgress:
    """Samples streamed per pass, with throughput, on stderr."""

    def __init__(self, console: Console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} samples/s"), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=console, transient=True,
                            disable=not console.is_terminal)
        self.task = None
        self.done = 0

    def start_pass(self, index: int, total: int | None, label: str | None = None) -> None:
        self.started, self.done = time.perf_counter(), 0
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("", total=total, rate="–")
        self.bar.reset(self.task, total=total, description=label or f"pass {index + 1}", rate="–")

    def advance(self, samples: int) -> None:
        self.done += samples
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, advance=samples, rate=f"{rate:,.0f}")

    def end_pass(self) -> None: ...

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()
