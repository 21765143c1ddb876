"""The ``bnrepair`` command: parse options, call the API, render the result. No logic of its own."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Annotated, Optional

import rich.markup
import typer
from rich.console import Console

from .errors import BnrepairError, require
from .version import __version__

EXIT_CODES = """Exit codes: 0 success; 2 bad input (file, data or option; one-line message, nothing written);
3 --mode eval did not converge within --max-passes (the output is written, with a warning);
4 under torchrun, a rank did not answer within --dist-timeout; 130 interrupted (nothing written);
1 unexpected internal error."""


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


app = typer.Typer(
    name="bnrepair",
    help="Repair BatchNorm statistics in saved checkpoints (Keras .h5/.keras, TensorFlow SavedModel, "
    "PyTorch .pt; ONNX export).\n\n" + EXIT_CODES,
    cls=OneLineUsageErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Lines are never hard-wrapped (the terminal wraps them; a pipe or a log gets each whole, paths unbroken);
# tables are still laid out to the width.
err = Console(stderr=True, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    """One line on stderr, even when the message quotes an exception's multi-line text; plain text, not
    markup (a path may hold [brackets])."""
    from .terminal import shown

    line = re.sub(r"\s*\n\s*", " ", message.strip())
    err.print(f"[bold red]error:[/] {shown(line)}", highlight=False, soft_wrap=True)


def user_errors(command):
    """Turn a user mistake into one line on stderr and exit 2; an interrupt into exit 130.

    SIGTERM (``kill``, ``timeout``, a job scheduler) interrupts like Ctrl-C, so temporary files are
    removed on the way out instead of being left behind by the default handler. With ``--quiet`` the
    libraries' own warnings (zipfile, Keras, torch, Pillow, numpy) are silenced too: errors only.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        in_main = threading.current_thread() is threading.main_thread()  # where signal handlers are set
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main else None
        try:
            with warnings.catch_warnings():
                if kwargs.get("quiet"):
                    warnings.simplefilter("ignore")
                return command(*args, **kwargs)
        except BnrepairError as exc:
            print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None
        finally:
            if previous is not None and signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:  # not committed
                signal.signal(signal.SIGTERM, previous)

    return wrapper


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
        import time

        self.started, self.done = time.perf_counter(), 0
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("", total=total, rate="–")
        self.bar.reset(self.task, total=total, description=label or f"pass {index + 1}", rate="–")

    def advance(self, samples: int) -> None:
        import time

        self.done += samples
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, advance=samples, rate=f"{rate:,.0f}")

    def end_pass(self) -> None: ...

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()


def version_callback(value: bool):
    if value:
        typer.echo(f"bnrepair {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="Print the version and exit.")):
    """Repair BatchNorm statistics in saved checkpoints."""


# Options shared by the commands that load a checkpoint and stream data.
Checkpoint = Annotated[Path, typer.Argument(help="Keras .h5/.keras, TF SavedModel dir or PyTorch .pt checkpoint "
                                            "(never modified).")]
Data = Annotated[Optional[Path], typer.Option("--data", "-d", help="Image folder (recursive; class sub-folders "
                                              "allowed), .npy, or .npz (array 'x' or its only array; 'y' labels).",
                                              rich_help_panel="Data")]
Mode = Annotated[str, typer.Option(help="train: BN uses batch statistics while measured, one pass (PreciseBN). "
                                   "eval: inference-consistent fixed point over repeated passes.",
                                   rich_help_panel="Recalibration")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Samples per batch.", rich_help_panel="Data")]
Seed = Annotated[int, typer.Option(min=0, help="Shuffle seed; the same seed gives bit-identical output.",
                                   rich_help_panel="Data")]
Tol = Annotated[float, typer.Option(help="eval mode: stop when no statistic moves more than this (in std units).",
                                    rich_help_panel="Recalibration")]
Device = Annotated[str, typer.Option(help="auto, cpu, or gpu/cuda.", rich_help_panel="Recalibration")]
ImageSize = Annotated[Optional[tuple[int, int]], typer.Option("--image-size", help="Resize images to H W "
                                                              "[default: the model's declared input size].",
                                                              rich_help_panel="Data")]
Preprocess = Annotated[str, typer.Option(help="Image scaling: unit [0,1], raw 0..255, tf [-1,1], caffe, imagenet.",
                                         rich_help_panel="Data")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip undecodable images (counted) instead of failing.",
                                       rich_help_panel="Data")]
def writable_folder(path: Optional[Path]) -> Optional[Path]:
    """--json and --plot are written after the work: their folders are checked before any of it starts."""
    from .writers import check_output

    try:
        return path if path is None or is_stdout(path) else check_output(None, path)
    except BnrepairError as exc:
        raise typer.BadParameter(str(exc)) from None


JsonPath = Annotated[Optional[Path], typer.Option("--json", callback=writable_folder,
                                                  help="Also write the report as JSON here; - for standard output "
                                                  "(the table then goes to standard error).",
                                                  rich_help_panel="Output")]


def is_stdout(path: Optional[Path]) -> bool:
    return path is not None and str(path) == "-"


def screen(json_path: Optional[Path]) -> Console:
    """Where the human report goes: standard output, unless --json - claims it for the JSON."""
    return err if is_stdout(json_path) else out
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no table; errors only.",
                                     rich_help_panel="Output")]
CustomObjects = Annotated[Optional[Path], typer.Option("--custom-objects", help="Keras: a .py file whose Keras "
                                                       "classes are needed to load the model (it is run).",
                                                       rich_help_panel="Loading: Keras")]
Unsafe = Annotated[bool, typer.Option("--unsafe", help="Keras: turn safe_mode off (runs Lambda bytecode).",
                                      rich_help_panel="Loading: Keras")]
Arch = Annotated[Optional[str], typer.Option(help="torch state_dict: MODULE:CALLABLE or FILE.py:CALLABLE that "
                                             "builds the module.", rich_help_panel="Loading: PyTorch")]
ArchKwargs = Annotated[Optional[str], typer.Option("--arch-kwargs", help="torch: JSON keyword arguments for --arch.",
                                                   rich_help_panel="Loading: PyTorch")]
Key = Annotated[Optional[str], typer.Option(help="torch checkpoint dict: the entry holding the state_dict.",
                                            rich_help_panel="Loading: PyTorch")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="torch: allow full pickled modules (runs code).",
                                           rich_help_panel="Loading: PyTorch")]
TrustCode = Annotated[bool, typer.Option("--trust-code", help="torch: allow TorchScript archives; SavedModel and "
                                         "TF1: allow graph ops with side effects or file access (both run the "
                                         "file's code).",
                                         rich_help_panel="Loading: PyTorch")]
SafeGlobal = Annotated[Optional[list[str]], typer.Option("--safe-global", help="torch: allow one more global "
                                                         "(mod.Name) in weights_only loading; repeatable.",
                                                         rich_help_panel="Loading: PyTorch")]
Signature = Annotated[str, typer.Option(help="SavedModel: the serving signature to run.",
                                        rich_help_panel="Loading: SavedModel")]
InputName = Annotated[Optional[str], typer.Option("--input", help="SavedModel: the signature input to feed; ONNX: "
                                                  "the graph input; TF1: the placeholder (or any tensor); when "
                                                  "there are several.",
                                                  rich_help_panel="Loading: SavedModel / ONNX / TF1")]
Feed = Annotated[Optional[list[str]], typer.Option("--feed", help="TF1 checkpoint: NAME=VALUE, the value a "
                                                   "placeholder takes at inference (keep_prob=1); repeatable. The "
                                                   "training flag is found and fed false without it.",
                                                   rich_help_panel="Loading: TF1")]
Amp = Annotated[Optional[str], typer.Option("--amp", help="PyTorch: run the forward under torch.autocast in bf16 "
                                          "or fp16 (faster on GPUs; BN statistics still accumulate in float32). "
                                          "[default: off]", rich_help_panel="Loading: PyTorch")]
Step = Annotated[Optional[int], typer.Option("--step", help="TF1 model folder: the checkpoint of this global step "
                                             "[default: the latest, from its checkpoint file].",
                                             rich_help_panel="Loading: TF1")]
Workers = Annotated[Optional[int], typer.Option("--workers", min=1, help="Threads decoding images [default: the "
                                               "CPUs this process may use].", rich_help_panel="Data")]
FastJpeg = Annotated[bool, typer.Option("--fast-jpeg", help="Decode large JPEGs at a reduced DCT scale, then resize: "
                                        "faster, not identical (1024x768 -> 224: means within 1e-4 std, variances "
                                        "within 0.6%).", rich_help_panel="Data")]
DataFn = Annotated[Optional[str], typer.Option("--data-fn", help="MODULE:CALLABLE returning an iterable of "
                                               "batches (instead of --data).", rich_help_panel="Data")]
InputIndex = Annotated[int, typer.Option("--input-index", help="Which element of a tuple batch is the input.",
                                         rich_help_panel="Data")]
DistTimeout = Annotated[float, typer.Option("--dist-timeout", help="Under torchrun: seconds a rank waits for the "
                                            "others at the end of a pass before naming the one that did not "
                                            "answer.", rich_help_panel="Distributed (torchrun)")]


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


def load_options(custom_objects, unsafe, arch, arch_kwargs, key, trust_pickle, trust_code, safe_global,
                 signature, input_name, feed=None, step=None, amp=None) -> dict:
    """The load flags as the API's ``options``: one typed ``LoadOptions``."""
    from .options import LoadOptions

    return {"options": LoadOptions(custom_objects, unsafe, arch, arch_kwargs, key, trust_pickle, trust_code,
                                   tuple(safe_global or ()), signature, input_name, tuple(feed or ()), step,
                                   amp)}


def apart_from_input(checkpoint: Path, *reports: Optional[Path], inputs=(), outputs=()) -> None:
    """--json / --plot must neither replace the checkpoint nor land inside a SavedModel folder, nor be the
    calibration data (``inputs``) or another output (``outputs``: the repaired checkpoint, the ONNX)."""
    from .writers import check_output

    taken = {}
    for flag, path in [*(("the input", p) for p in inputs), *(("an output", p) for p in outputs)]:
        if path is not None:
            taken[os.path.realpath(path)] = flag
    for path in reports:
        if path is None or is_stdout(path):
            continue
        check_output(checkpoint, path)
        real = os.path.realpath(path)
        if real in taken:
            raise BnrepairError(f"{path}: is also {taken[real]} of this command; write the report elsewhere")
        taken[real] = "an output"


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


_OWN_PROCESS = False  # set by main(): the process is the bnrepair command, its signal dispositions are ours


def committed() -> None:
    """Every output is in place. An interrupt from here on would only misreport the run (the wrapper would say
    nothing was written, a default handler would kill the process by the signal with the outputs complete), so
    the command ignores SIGINT and SIGTERM from here, prints its summary and exits with its own status. (Ignored,
    not blocked: a signal blocked in this thread is delivered to one of the frameworks' threads instead.)"""
    if _OWN_PROCESS:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def calibration_source(data, data_fn, group=None):
    """--data or --data-fn, exactly one of them. Under torchrun the --data-fn batches are the same on every rank
    (the same callable runs on each), so the ranks share them out as they do --data."""
    from .distributed import SameOnEveryRank
    from .user_code import data_from

    if (data is None) == (data_fn is None):
        raise BnrepairError("give calibration data with --data PATH or --data-fn MODULE:CALLABLE (one of them)")
    if data_fn is None:
        return data
    return data_from(data_fn) if group is None else SameOnEveryRank(data_from(data_fn))


@app.command(cls=Command, epilog=EXIT_CODES)
@user_errors
def recalibrate(
    checkpoint: Checkpoint,
    data: Data = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output path [default: "
                                                   "<stem>.recalibrated<suffix> beside the input].",
                                                   rich_help_panel="Output")] = None,
    mode: Mode = "train",
    batch_size: BatchSize = 32,
    seed: Seed = 0,
    samples: Annotated[Optional[int], typer.Option(min=2, help="Use at most N samples [default: all].",
                                                   rich_help_panel="Data")] = None,
    tol: Tol = 1e-4,
    max_passes: Annotated[int, typer.Option("--max-passes", min=2, help="eval mode: at most this many passes, the "
                                            "PreciseBN start included.", rich_help_panel="Recalibration")] = 50,
    layers: Annotated[Optional[str], typer.Option(help="Recalibrate only BN layers whose id matches this "
                                                  "regex.", rich_help_panel="Recalibration")] = None,
    skip: Annotated[Optional[str], typer.Option(help="Leave BN layers whose id matches this regex "
                                                "unchanged.", rich_help_panel="Recalibration")] = None,
    device: Device = "auto",
    image_size: ImageSize = None,
    preprocess: Preprocess = "unit",
    skip_bad: SkipBad = False,
    json_path: JsonPath = None,
    quiet: Quiet = False,
    custom_objects: CustomObjects = None,
    unsafe: Unsafe = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    trust_code: TrustCode = False,
    safe_global: SafeGlobal = None,
    signature: Signature = "serving_default",
    input_name: InputName = None,
    feed: Feed = None,
    step: Step = None,
    amp: Amp = None,
    data_fn: DataFn = None,
    input_index: InputIndex = 0,
    workers: Workers = None,
    fast_jpeg: FastJpeg = False,
    cache_mb: Annotated[Optional[float], typer.Option("--cache-mb", help="--mode eval on an image folder: decode "
                                                      "once and keep the samples for the passes when they fit this "
                                                      "many MB (0: never; the values are the same either way) "
                                                      "[default: a quarter of the memory available].",
                                                      rich_help_panel="Data")] = None,
    export: Annotated[Optional[Path], typer.Option("--export", help="Also write the recalibrated model as ONNX "
                                                   "here, verified in onnxruntime (nothing is written if it "
                                                   "fails).", rich_help_panel="Output")] = None,
    fold: Annotated[bool, typer.Option("--fold", help="With --export: fold BN into conv/dense weights "
                                       "first.", rich_help_panel="Output")] = False,
    dist_timeout: DistTimeout = 1800.0,
):
    """Recompute BN moving mean/variance from calibration data and write a repaired checkpoint.

    Under torchrun (torchrun --nproc-per-node N -m bnrepair recalibrate ...) the ranks share the batches out
    and merge their moments exactly: the output is what one process would write, and rank 0 writes it.
    """
    from .api import recalibrate as run_recalibrate
    from .writers import default_output

    apart_from_input(checkpoint, json_path, inputs=[data], outputs=[output or default_output(checkpoint), export])
    with ranks(dist_timeout) as group:
        speaks = group is None or group.rank == 0  # the other ranks print errors only
        quiet, json_path = (quiet, json_path) if speaks else (True, None)
        source = calibration_source(data, data_fn, group)
        progress = None if quiet else RichProgress(err)
        try:
            report = run_recalibrate(
                checkpoint, source, output=output, mode=mode, batch_size=batch_size, seed=seed, samples=samples,
                tol=tol, layers=layers, skip=skip, device=device, image_size=image_size, preprocess=preprocess,
                skip_bad=skip_bad, input_index=input_index, progress=progress, max_passes=max_passes,
                export=export, fold=fold, workers=workers, cache_mb=cache_mb, fast_jpeg=fast_jpeg,
                process_group=group, **load_options(custom_objects, unsafe, arch, arch_kwargs, key, trust_pickle,
                                                    trust_code, safe_global, signature, input_name, feed, step, amp))
        finally:
            if progress is not None:
                progress.close()
    write_report(report, json_path, report.output, report.export.output if report.export is not None else None)
    if not quiet:
        report.render(screen(json_path))
        if report.export is not None:
            report.export.render(screen(json_path))
    if report.classes_lost and speaks:
        from .terminal import shown

        err.print(f"[yellow]warning:[/] {shown(report.classes_note())}", highlight=False)
    if not report.converged:
        if speaks:
            err.print(f"[yellow]warning:[/] {report.convergence_note()}", highlight=False, soft_wrap=True)
        raise typer.Exit(3)


@app.command(cls=Command, epilog="Exit codes: 0 no problem found; 1 problems found; 2 bad input.")
@user_errors
def inspect(
    checkpoint: Checkpoint,
    json_path: JsonPath = None,
    quiet: Quiet = False,
    custom_objects: CustomObjects = None,
    unsafe: Unsafe = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    trust_code: TrustCode = False,
    safe_global: SafeGlobal = None,
    signature: Signature = "serving_default",
    input_name: InputName = None,
    feed: Feed = None,
    step: Step = None,
):
    """List every BN layer with its settings and stored statistics, and flag what looks wrong (no data)."""
    from .api import inspect as run_inspect

    single_process("inspect")
    apart_from_input(checkpoint, json_path)
    report = run_inspect(checkpoint, **load_options(custom_objects, unsafe, arch, arch_kwargs, key, trust_pickle,
                                                    trust_code, safe_global, signature, input_name, feed, step))
    if json_path:
        report.write_json(json_path)
    if not quiet:
        report.render(screen(json_path))
    raise typer.Exit(1 if report.problems else 0)


@app.command(cls=Command, epilog="Exit codes: 0 healthy; 1 problems found; 2 bad input. Works as a CI gate.")
@user_errors
def diagnose(
    checkpoint: Checkpoint,
    data: Data = None,
    threshold: Annotated[float, typer.Option(help="A channel is off when its mean shift (in data std) or "
                                             "|ln variance ratio| exceeds this.", rich_help_panel="Diagnosis")] = 0.5,
    plot: Annotated[Optional[Path], typer.Option(callback=writable_folder, help="Draw per-layer mean shift and "
                                                 "variance ratio to this PNG.", rich_help_panel="Output")] = None,
    mode: Mode = "train",
    batch_size: BatchSize = 32,
    seed: Seed = 0,
    samples: Annotated[Optional[int], typer.Option(min=2, help="Read at most N samples (kept in memory).",
                                                   rich_help_panel="Data")] = 1024,
    tol: Tol = 1e-4,
    device: Device = "auto",
    image_size: ImageSize = None,
    preprocess: Preprocess = "unit",
    skip_bad: SkipBad = False,
    json_path: JsonPath = None,
    quiet: Quiet = False,
    custom_objects: CustomObjects = None,
    unsafe: Unsafe = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    trust_code: TrustCode = False,
    safe_global: SafeGlobal = None,
    signature: Signature = "serving_default",
    input_name: InputName = None,
    feed: Feed = None,
    step: Step = None,
    amp: Amp = None,
    data_fn: DataFn = None,
    input_index: InputIndex = 0,
    workers: Workers = None,
    fast_jpeg: FastJpeg = False,
    dist_timeout: DistTimeout = 1800.0,
):
    """Say which BN layers are wrong and why, with evidence, and what a recalibration would give back."""
    import shlex

    from .api import diagnose as run_diagnose

    apart_from_input(checkpoint, json_path, plot, inputs=[data])
    if plot:
        require(("matplotlib",), "--plot", "plot")  # before the diagnosis, not after it
    given = {"--data": data, "--data-fn": data_fn, "--mode": None if mode == "train" else mode,
             "--preprocess": None if preprocess == "unit" else preprocess, "--arch": arch,
             "--arch-kwargs": arch_kwargs, "--key": key, "--custom-objects": custom_objects,
             "--signature": None if signature == "serving_default" else signature, "--input": input_name,
             "--step": step, "--amp": amp}
    words = [str(checkpoint)] + [w for flag, value in given.items() if value is not None for w in (flag, str(value))]
    words += [flag for flag, on in (("--trust-pickle", trust_pickle), ("--trust-code", trust_code),
                                    ("--unsafe", unsafe)) if on]
    words += [w for flag, values in (("--safe-global", safe_global), ("--feed", feed)) for value in values or []
              for w in (flag, value)]
    fix = "bnrepair recalibrate " + shlex.join(words)
    with ranks(dist_timeout) as group:
        speaks = group is None or group.rank == 0  # the other ranks print errors only
        quiet, json_path, plot = (quiet, json_path, plot) if speaks else (True, None, None)
        source = calibration_source(data, data_fn, group)
        progress = None if quiet else RichProgress(err)
        try:
            report = run_diagnose(
                checkpoint, source, threshold=threshold, mode=mode, batch_size=batch_size, seed=seed,
                samples=samples, tol=tol, device=device, image_size=image_size, preprocess=preprocess,
                skip_bad=skip_bad, input_index=input_index, fix_command=fix, progress=progress, workers=workers,
                fast_jpeg=fast_jpeg, process_group=group,
                **load_options(custom_objects, unsafe, arch, arch_kwargs, key, trust_pickle, trust_code, safe_global,
                               signature, input_name, feed, step, amp))
        finally:
            if progress is not None:
                progress.close()
    if json_path:
        report.write_json(json_path)
    if plot:
        from .plot import plot_evidence

        plot_evidence(report, plot)
    if not quiet:
        report.render(screen(json_path))
    raise typer.Exit(0 if report.healthy else 1)


# Options of the deployment commands (fold, export).
VerifySamples = Annotated[int, typer.Option("--samples", min=1, help="Verify on at most N samples of --data (or "
                                            "N generated inputs of the declared shape).",
                                            rich_help_panel="Verification")]
Atol = Annotated[float, typer.Option(help="Verification: allowed |difference| = atol + rtol * the largest |value| "
                                     "of that output or layer in the source (float32 errs relative to the size "
                                     "of what it sums).",
                                     rich_help_panel="Verification")]
Rtol = Annotated[float, typer.Option(help="Verification: see --atol.", rich_help_panel="Verification")]
Opset = Annotated[int, typer.Option(help="ONNX opset.", rich_help_panel="Output")]


def deploy(run, checkpoint, output, data, data_fn, preprocess, json_path, quiet, custom_objects, unsafe, arch,
           arch_kwargs, key, trust_pickle, trust_code, safe_global, graph_options=("serving_default", None, None, None),
           **options):
    """Shared by fold and export: data (optional here), load options (``graph_options``: signature, input, feed
    and step, for graphs), the report."""
    single_process(run.__name__)
    apart_from_input(checkpoint, json_path, inputs=[data], outputs=[output])
    source = calibration_source(data, data_fn) if data is not None or data_fn else None
    report = run(checkpoint, output, data=source, preprocess=preprocess,
                 **load_options(custom_objects, unsafe, arch, arch_kwargs, key, trust_pickle, trust_code,
                                safe_global, *graph_options), **options)
    write_report(report, json_path, report.output)
    if not quiet:
        report.render(screen(json_path))


@app.command(cls=Command, epilog=EXIT_CODES)
@user_errors
def fold(
    checkpoint: Checkpoint,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Keras .h5/.keras, torch .pt2, or "
                                                   ".onnx [default: <stem>.folded<suffix> beside the input; "
                                                   ".pt2 for torch].", rich_help_panel="Output")] = None,
    data: Data = None,
    samples: VerifySamples = 64,
    atol: Atol = 1e-4,
    rtol: Rtol = 1e-4,
    opset: Opset = 17,
    batch_size: BatchSize = 32,
    seed: Seed = 0,
    device: Device = "auto",
    image_size: ImageSize = None,
    preprocess: Preprocess = "unit",
    json_path: JsonPath = None,
    quiet: Quiet = False,
    custom_objects: CustomObjects = None,
    unsafe: Unsafe = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    trust_code: TrustCode = False,
    safe_global: SafeGlobal = None,
    data_fn: DataFn = None,
    input_index: InputIndex = 0,
):
    """Fold every BN layer that folds exactly into its conv/dense neighbour; the rest stay, with the reason.

    The folded model is checked against the source on --data (or generated inputs): every output and every
    folded layer's output, element-wise within --atol/--rtol, or nothing is written.
    """
    from .api import fold as run_fold

    deploy(run_fold, checkpoint, output, data, data_fn, preprocess, json_path, quiet, custom_objects, unsafe, arch,
           arch_kwargs, key, trust_pickle, trust_code, safe_global, samples=samples, atol=atol, rtol=rtol,
           opset=opset, batch_size=batch_size, seed=seed, device=device, image_size=image_size,
           input_index=input_index)


@app.command(cls=Command, epilog=EXIT_CODES)
@user_errors
def export(
    checkpoint: Checkpoint,
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx file to write.", rich_help_panel="Output")],
    fold: Annotated[bool, typer.Option("--fold/--no-fold", help="Fold BN into conv/dense weights first.",
                                       rich_help_panel="Output")] = False,
    opset: Opset = 17,
    data: Data = None,
    samples: VerifySamples = 64,
    atol: Atol = 1e-4,
    rtol: Rtol = 1e-4,
    batch_size: BatchSize = 32,
    seed: Seed = 0,
    device: Device = "auto",
    image_size: ImageSize = None,
    preprocess: Preprocess = "unit",
    json_path: JsonPath = None,
    quiet: Quiet = False,
    custom_objects: CustomObjects = None,
    unsafe: Unsafe = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    trust_pickle: TrustPickle = False,
    trust_code: TrustCode = False,
    safe_global: SafeGlobal = None,
    signature: Signature = "serving_default",
    input_name: InputName = None,
    feed: Feed = None,
    step: Step = None,
    data_fn: DataFn = None,
    input_index: InputIndex = 0,
):
    """Write the model as ONNX (dynamic batch axis, provenance in metadata_props), verified in onnxruntime.

    onnxruntime runs on CUDA when it is usable, else on the CPU; outputs must match the source on --data (or
    generated inputs) within --atol/--rtol, or nothing is written.
    """
    from .api import export as run_export

    deploy(run_export, checkpoint, output, data, data_fn, preprocess, json_path, quiet, custom_objects, unsafe,
           arch, arch_kwargs, key, trust_pickle, trust_code, safe_global, (signature, input_name, feed, step),
           fold=fold, opset=opset, samples=samples, atol=atol, rtol=rtol, batch_size=batch_size, seed=seed,
           device=device, image_size=image_size, input_index=input_index)


def main():
    global _OWN_PROCESS
    _OWN_PROCESS = True
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
