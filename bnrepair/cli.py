"""The ``bnrepair`` command: parse flags into option groups, call the API, render the result, map exit codes.

What it adds to the API is the command's life as a process: SIGTERM handled as an interrupt, outputs
committed before the summary, and the torchrun process group joined and left around a run. Each option's
flag and help live on its field in ``options``; the aliases below only attach them to typer.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import session
from .console import Command, OneLineUsageErrors, RichProgress, err, out, warn
from .errors import BnrepairError, require
from .options import DataOptions, LoadOptions, RecalibrationOptions, VerifyOptions
from .session import ranks, single_process, user_errors, write_report
from .version import __version__

EXIT_CODES = """Exit codes: 0 success; 2 bad input (file, data or option; one-line message, nothing written);
3 --mode eval did not converge within --max-passes (the output is written, with a warning);
4 under torchrun, a rank did not answer within --dist-timeout; 130 interrupted (nothing written);
1 unexpected internal error."""

app = typer.Typer(
    name="bnrepair",
    help="Repair BatchNorm statistics in saved checkpoints (Keras .h5/.keras, TensorFlow SavedModel, "
    "PyTorch .pt, ONNX, TF1 training checkpoints; ONNX export).\n\n" + EXIT_CODES,
    cls=OneLineUsageErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version_callback(value: bool):
    if value:
        typer.echo(f"bnrepair {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="Print the version and exit.")):
    """Repair BatchNorm statistics in saved checkpoints."""


def flag(group, name: str, *also: str, **settings):
    """The typer option of a group's field: its flag (and short ``also`` names), help and panel from the field;
    ``settings`` add to or override them (``min=1``, a command's own ``help``)."""
    meta = group.__dataclass_fields__[name].metadata
    settings = {"help": meta["help"], "rich_help_panel": meta["panel"], **settings}
    return typer.Option(meta["flag"], *also, **settings)


def writable_folder(path: Optional[Path]) -> Optional[Path]:
    """--json and --plot are written after the work: their folders are checked before any of it starts."""
    from .writers import check_output

    try:
        return path if path is None or is_stdout(path) else check_output(None, path)
    except BnrepairError as exc:
        raise typer.BadParameter(str(exc)) from None


Checkpoint = Annotated[Path, typer.Argument(help="Keras .h5/.keras, TF SavedModel dir, PyTorch .pt, ONNX .onnx or "
                                            "TF1 checkpoint prefix (never modified).")]
Data = Annotated[Optional[Path], typer.Option("--data", "-d", help="Image folder (recursive; class sub-folders "
                                              "allowed), .npy, or .npz (array 'x' or its only array; 'y' labels).",
                                              rich_help_panel="Data")]
DataFn = Annotated[Optional[str], typer.Option("--data-fn", help="MODULE:CALLABLE returning an iterable of "
                                               "batches (instead of --data).", rich_help_panel="Data")]
Device = Annotated[str, typer.Option(help="auto, cpu, or gpu/cuda.", rich_help_panel="Recalibration")]
JsonPath = Annotated[Optional[Path], typer.Option("--json", callback=writable_folder,
                                                  help="Also write the report as JSON here; - for standard output "
                                                  "(the table then goes to standard error).",
                                                  rich_help_panel="Output")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no table; errors only.",
                                     rich_help_panel="Output")]
DistTimeout = Annotated[float, typer.Option("--dist-timeout", help="Under torchrun: seconds a rank waits for the "
                                            "others at the end of a pass before naming the one that did not "
                                            "answer.", rich_help_panel="Distributed (torchrun)")]
# DataOptions
BatchSize = Annotated[int, flag(DataOptions, "batch_size", "-b", min=1)]
Seed = Annotated[int, flag(DataOptions, "seed", min=0)]
ImageSize = Annotated[Optional[tuple[int, int]], flag(DataOptions, "image_size")]
Preprocess = Annotated[Optional[str], flag(DataOptions, "preprocess")]
SkipBad = Annotated[bool, flag(DataOptions, "skip_bad")]
InputIndex = Annotated[int, flag(DataOptions, "input_index")]
Workers = Annotated[Optional[int], flag(DataOptions, "workers", min=1)]
FastJpeg = Annotated[bool, flag(DataOptions, "fast_jpeg")]
CacheMb = Annotated[Optional[float], flag(DataOptions, "cache_mb")]
# RecalibrationOptions
Mode = Annotated[str, flag(RecalibrationOptions, "mode")]
Tol = Annotated[float, flag(RecalibrationOptions, "tol")]
MaxPasses = Annotated[Optional[int], flag(RecalibrationOptions, "max_passes", min=2)]
EvalBatchSize = Annotated[Optional[int], flag(RecalibrationOptions, "eval_batch_size", min=1)]
Layers = Annotated[Optional[str], flag(RecalibrationOptions, "layers")]
Skip = Annotated[Optional[str], flag(RecalibrationOptions, "skip")]
# VerifyOptions
VerifySamples = Annotated[int, flag(VerifyOptions, "samples", min=1)]
Atol = Annotated[float, flag(VerifyOptions, "atol")]
Rtol = Annotated[float, flag(VerifyOptions, "rtol")]
NoiseMargin = Annotated[float, flag(VerifyOptions, "noise_margin")]
Opset = Annotated[int, flag(VerifyOptions, "opset")]
# LoadOptions
CustomObjects = Annotated[Optional[Path], flag(LoadOptions, "custom_objects")]
Unsafe = Annotated[bool, flag(LoadOptions, "unsafe")]
Arch = Annotated[Optional[str], flag(LoadOptions, "arch")]
ArchKwargs = Annotated[Optional[str], flag(LoadOptions, "arch_kwargs")]
Key = Annotated[Optional[str], flag(LoadOptions, "key")]
Prefix = Annotated[Optional[str], flag(LoadOptions, "prefix")]
TrustPickle = Annotated[bool, flag(LoadOptions, "trust_pickle")]
TrustCode = Annotated[bool, flag(LoadOptions, "trust_code")]
SafeGlobals = Annotated[Optional[list[str]], flag(LoadOptions, "safe_globals")]
Signature = Annotated[str, flag(LoadOptions, "signature")]
InputName = Annotated[Optional[str], flag(LoadOptions, "input_name")]
Feeds = Annotated[Optional[list[str]], flag(LoadOptions, "feeds")]
Step = Annotated[Optional[int], flag(LoadOptions, "step")]
Amp = Annotated[Optional[str], flag(LoadOptions, "amp")]


def is_stdout(path: Optional[Path]) -> bool:
    return path is not None and str(path) == "-"


def screen(json_path: Optional[Path]) -> Console:
    """Where the human report goes: standard output, unless --json - claims it for the JSON."""
    return err if is_stdout(json_path) else out


def apart_from_input(checkpoint: Path, *reports: Optional[Path], inputs=(), outputs=()) -> None:
    """--json / --plot must neither replace the checkpoint nor land inside a SavedModel folder, nor be the
    calibration data (``inputs``) or another output (``outputs``: the repaired checkpoint, the ONNX)."""
    from .writers import check_output

    taken = {}
    for flag_name, path in [*(("the input", p) for p in inputs), *(("an output", p) for p in outputs)]:
        if path is not None:
            taken[os.path.realpath(path)] = flag_name
    for path in reports:
        if path is None or is_stdout(path):
            continue
        check_output(checkpoint, path)
        real = os.path.realpath(path)
        if real in taken:
            raise BnrepairError(f"{path}: is also {taken[real]} of this command; write the report elsewhere")
        taken[real] = "an output"


def calibration_source(data: Optional[Path], data_fn: Optional[str]):
    """--data or --data-fn, exactly one of them (a ``--data-fn`` is imported now, called when batches are read)."""
    from .user_code import DataFunction

    if (data is None) == (data_fn is None):
        raise BnrepairError("give calibration data with --data PATH or --data-fn MODULE:CALLABLE (one of them)")
    return data if data_fn is None else DataFunction(data_fn)


def groups(flags: dict, *kinds) -> dict:
    """The option groups of a command's flags (its ``locals()``), as the API takes them by keyword."""
    return {kind.KEYWORD: kind.picked(flags) for kind in kinds}


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
    samples: Annotated[Optional[int], flag(DataOptions, "samples", min=2)] = None,
    tol: Tol = 1e-4,
    max_passes: MaxPasses = None,
    eval_batch_size: EvalBatchSize = None,
    layers: Layers = None,
    skip: Skip = None,
    device: Device = "auto",
    image_size: ImageSize = None,
    preprocess: Preprocess = None,
    skip_bad: SkipBad = False,
    json_path: JsonPath = None,
    quiet: Quiet = False,
    custom_objects: CustomObjects = None,
    unsafe: Unsafe = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    prefix: Prefix = None,
    trust_pickle: TrustPickle = False,
    trust_code: TrustCode = False,
    safe_globals: SafeGlobals = None,
    signature: Signature = "serving_default",
    input_name: InputName = None,
    feeds: Feeds = None,
    step: Step = None,
    amp: Amp = None,
    data_fn: DataFn = None,
    input_index: InputIndex = 0,
    workers: Workers = None,
    fast_jpeg: FastJpeg = False,
    cache_mb: CacheMb = None,
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
    from .recalibration import NotConverged
    from .writers import default_output

    options = groups(locals(), LoadOptions, DataOptions, RecalibrationOptions)
    warnings.filterwarnings("ignore", category=NotConverged)  # said below, with exit 3
    apart_from_input(checkpoint, json_path, inputs=[data], outputs=[output or default_output(checkpoint), export])
    source = calibration_source(data, data_fn)
    with ranks(dist_timeout) as group:
        speaks = group is None or group.rank == 0  # the other ranks print errors only
        quiet, json_path = (quiet, json_path) if speaks else (True, None)
        progress = None if quiet else RichProgress(err)
        try:
            report = run_recalibrate(checkpoint, source, output=output, export=export, fold=fold, device=device,
                                     progress=progress, process_group=group, **options)
        finally:
            if progress is not None:
                progress.close()
    write_report(report, json_path, report.output, report.export.output if report.export is not None else None)
    if not quiet:
        report.render(screen(json_path))
        if report.export is not None:
            report.export.render(screen(json_path))
    if report.classes_lost and speaks:
        warn(report.classes_note())
    if not report.converged:
        if speaks:
            warn(report.convergence_note())
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
    prefix: Prefix = None,
    trust_pickle: TrustPickle = False,
    trust_code: TrustCode = False,
    safe_globals: SafeGlobals = None,
    signature: Signature = "serving_default",
    input_name: InputName = None,
    feeds: Feeds = None,
    step: Step = None,
):
    """List every BN layer with its settings and stored statistics, and flag what looks wrong (no data)."""
    from .api import inspect as run_inspect

    single_process("inspect")
    apart_from_input(checkpoint, json_path)
    report = run_inspect(checkpoint, LoadOptions.picked(locals()))
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
    samples: Annotated[Optional[int], flag(DataOptions, "samples", min=2, help="Read at most N samples (kept in "
                                           "memory).")] = 1024,
    tol: Tol = 1e-4,
    eval_batch_size: EvalBatchSize = None,
    device: Device = "auto",
    image_size: ImageSize = None,
    preprocess: Preprocess = None,
    skip_bad: SkipBad = False,
    json_path: JsonPath = None,
    quiet: Quiet = False,
    custom_objects: CustomObjects = None,
    unsafe: Unsafe = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    prefix: Prefix = None,
    trust_pickle: TrustPickle = False,
    trust_code: TrustCode = False,
    safe_globals: SafeGlobals = None,
    signature: Signature = "serving_default",
    input_name: InputName = None,
    feeds: Feeds = None,
    step: Step = None,
    amp: Amp = None,
    data_fn: DataFn = None,
    input_index: InputIndex = 0,
    workers: Workers = None,
    fast_jpeg: FastJpeg = False,
    dist_timeout: DistTimeout = 1800.0,
):
    """Say which BN layers are wrong and why, with evidence, and what a recalibration would give back."""
    from .api import diagnose as run_diagnose

    options = groups(locals(), LoadOptions, DataOptions, RecalibrationOptions)
    apart_from_input(checkpoint, json_path, plot, inputs=[data])
    if plot:
        require(("matplotlib",), "--plot", "plot")  # before the diagnosis, not after it
    source = calibration_source(data, data_fn)
    with ranks(dist_timeout) as group:
        speaks = group is None or group.rank == 0  # the other ranks print errors only
        quiet, json_path, plot = (quiet, json_path, plot) if speaks else (True, None, None)
        progress = None if quiet else RichProgress(err)
        try:
            report = run_diagnose(checkpoint, source, threshold=threshold, device=device, progress=progress,
                                  process_group=group, **options)
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
    raise typer.Exit(0 if report.healthy or not speaks else 1)  # under torchrun, one rank's exit carries the verdict


def deploy(run, checkpoint: Path, output: Optional[Path], flags: dict, **settings) -> None:
    """Shared by fold and export: data (optional here), the option groups of the command's ``flags``, the
    report."""
    single_process(run.__name__)
    data, json_path = flags["data"], flags["json_path"]
    apart_from_input(checkpoint, json_path, inputs=[data], outputs=[output])
    source = calibration_source(data, flags["data_fn"]) if data is not None or flags["data_fn"] else None
    report = run(checkpoint, output, data=source, device=flags["device"], **settings,
                 **groups(flags, LoadOptions, DataOptions, VerifyOptions))
    write_report(report, json_path, report.output)
    if not flags["quiet"]:
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
    noise_margin: NoiseMargin = 16.0,
    opset: Opset = 17,
    batch_size: BatchSize = 32,
    seed: Seed = 0,
    device: Device = "auto",
    image_size: ImageSize = None,
    preprocess: Preprocess = None,
    json_path: JsonPath = None,
    quiet: Quiet = False,
    custom_objects: CustomObjects = None,
    unsafe: Unsafe = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    prefix: Prefix = None,
    trust_pickle: TrustPickle = False,
    trust_code: TrustCode = False,
    safe_globals: SafeGlobals = None,
    input_name: InputName = None,
    data_fn: DataFn = None,
    input_index: InputIndex = 0,
):
    """Fold every BN layer that folds exactly into its conv/dense neighbour; the rest stay, with the reason.

    The folded model is checked against the source on --data (or generated inputs): every output and every
    folded layer's output, element-wise within --atol/--rtol, or nothing is written.
    """
    from .api import fold as run_fold

    deploy(run_fold, checkpoint, output, locals())


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
    noise_margin: NoiseMargin = 16.0,
    batch_size: BatchSize = 32,
    seed: Seed = 0,
    device: Device = "auto",
    image_size: ImageSize = None,
    preprocess: Preprocess = None,
    json_path: JsonPath = None,
    quiet: Quiet = False,
    custom_objects: CustomObjects = None,
    unsafe: Unsafe = False,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    key: Key = None,
    prefix: Prefix = None,
    trust_pickle: TrustPickle = False,
    trust_code: TrustCode = False,
    safe_globals: SafeGlobals = None,
    signature: Signature = "serving_default",
    input_name: InputName = None,
    feeds: Feeds = None,
    step: Step = None,
    data_fn: DataFn = None,
    input_index: InputIndex = 0,
):
    """Write the model as ONNX (dynamic batch axis, provenance in metadata_props), verified in onnxruntime.

    onnxruntime runs on CUDA when it is usable, else on the CPU; outputs must match the source on --data (or
    generated inputs) within --atol/--rtol, or nothing is written.
    """
    from .api import export as run_export

    deploy(run_export, checkpoint, output, locals(), fold=fold)


def main():
    session.own_process = True
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
