"""The Python API; the CLI is a thin layer over these functions.

``recalibrate`` takes a checkpoint path (and writes a repaired copy) or a model already in memory
(a ``keras.Model``, a ``torch.nn.Module``; its statistics are updated in place, the way
``torch.optim.swa_utils.update_bn`` does), plus calibration data: a path, an array, or any
re-iterable of batches.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import frameworks
from .data import (
    Cached,
    Calibration,
    ImageFolder,
    calibration,
    check_fits,
    check_path,
    check_preprocess,
    image_spec,
    preprocessing,
)
from .deploy import check_opset, prepare
from .diagnosis import compare, inspect_layers, output_evidence, verdicts
from .distributed import across_ranks, share_of
from .errors import InputError, NoBatchNorm
from .frameworks.onnx_runtime import require_onnx
from .metrics import as_scores
from .options import DataOptions, LoadOptions, RecalibrationOptions, VerifyOptions, check_device, grouped
from .protocols import Progress, Runner
from .recalibration import MODES, NotConverged, run
from .report import DeployReport, DiagnoseReport, InspectReport, Report
from .user_code import DataFunction
from .writers import check_output, default_output, removed_on_failure, sha256


def load(model, options: LoadOptions | None = None, *, device: str = "auto", **load_options) -> Runner:
    """A runner (``protocols.Runner``) for a checkpoint path or an in-memory model.

    Load options come as a ``LoadOptions`` or as its fields by keyword (``arch="net.py:build"``); one that
    does not apply to the file's format is refused.
    """
    options = LoadOptions.of(options, **load_options)
    if isinstance(model, Runner):
        return model
    if isinstance(model, (str, Path)):
        return frameworks.load(Path(model), options, device)
    if options.given():
        raise InputError(f"load options ({', '.join(options.given())}) apply to checkpoint files, not to a model "
                         "in memory")
    return frameworks.wrap(model, device)


DIAGNOSE_MIN_SAMPLES = 32
DIAGNOSE_SAMPLES = 1024
"""diagnose reads at most this many samples by default (it keeps them in memory for its passes)"""


def _checked_request(data, options: DataOptions, mode: str | None = None, device="auto") -> None:
    """What can be refused before a framework is imported and a model loaded (seconds, for TensorFlow)."""
    check_preprocess(options.preprocess)
    check_path(data)
    if mode is not None and mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(device, str):  # a torch.device is checked by torch
        check_device(device)


@across_ranks
def recalibrate(model, data, *, output=None, export=None, fold: bool = False, device: str = "auto",
                progress: Progress | None = None, process_group=None, options: LoadOptions | None = None,
                data_options: DataOptions | None = None, recalibration: RecalibrationOptions | None = None,
                **given) -> Report:
    """Recompute every chosen BN layer's statistics from ``data``; returns the report.

    With a path, the repaired checkpoint goes to ``output`` (default ``<stem>.recalibrated<suffix>``)
    and the input is never modified; with an in-memory model, the model itself is updated.
    ``export``: also write the recalibrated model (BN folded with ``fold``) as verified ONNX there;
    when its verification fails nothing at all is written.

    Options come as groups (``options``: ``LoadOptions``, ``data_options``: ``DataOptions``, ``recalibration``:
    ``RecalibrationOptions``) or as their fields by keyword (``mode="eval"``, ``batch_size=64``, ``arch=...``).
    ``workers``: image-decoding threads (default: the CPUs this process may use). ``fast_jpeg``: see
    ``data.ImageSpec.fast_jpeg``. ``cache_mb``: in eval mode, an image folder whose decoded samples fit this many
    MB (default a quarter of the memory available; 0: never) is decoded once and kept for the passes.

    Inside an initialized ``torch.distributed`` process group (torchrun, a DDP script) every rank calls this and
    the moments are merged across the group (``distributed``); ``process_group`` picks a group, False opts out.
    Each rank then ends with the same statistics, and only rank 0 writes. A path or array given as ``data`` is
    one data set, shared out by batches; any other iterable is each rank's own data.
    """
    load_opts, data_opts, loop = grouped(given, (LoadOptions, options), (DataOptions, data_options),
                                         (RecalibrationOptions, recalibration))
    group = process_group or None  # resolved by ``across_ranks``
    writes = group is None or group.rank == 0
    source = None
    if isinstance(model, (str, Path)):
        model = source = frameworks.checkpoint_of(Path(model), load_opts)
    if source is not None:
        output = check_output(source, Path(output) if output else default_output(source))
        if source.is_file() and output.suffix.lower() != source.suffix.lower():
            raise InputError(f"{output}: the repaired checkpoint has the input's format; name it *{source.suffix} "
                             "(use --export for ONNX)")
    onnx_path = export_target(source, export, fold, output)
    if onnx_path is not None:
        require_onnx()
    _checked_request(data, data_opts, loop.mode, device)
    try:
        runner = load(model, load_opts, device=device)
    except NoBatchNorm:
        if source is not None:  # a checkpoint without BN is the wrong file
            raise
        return Report.nothing_to_do(frameworks.claimant(model), loop.mode, str(device))  # as update_bn does
    if onnx_path is not None and fold:  # a format that cannot be folded is refused before the recalibration
        refuse_unfoldable(runner, source)
    stream = calibration(data, image_spec(runner.graph, data_opts), data_opts, share_of(group))
    check_fits(runner.graph, stream)
    outcome = run(runner, decoded_once(stream, loop.mode, data_opts.cache_mb, progress), loop, progress=progress,
                  group=group)
    if group is not None:  # undecodable images of every rank
        stream.bad = set(group.gathered(np.array(sorted(stream.bad), np.float64)).astype(int).tolist())
    report = Report.of(outcome, runner.framework, loop.mode, str(runner.device), stream.seed,
                       skipped_bad=len(stream.bad), classes_lost=getattr(stream, "classes_lost", list)(),
                       world_size=1 if group is None else group.size)
    report.run = recorded(data, device, runner.graph, load_opts, data_opts, loop)
    if not outcome.converged:
        warnings.warn(report.convergence_note(), NotConverged, stacklevel=3)  # the caller, past across_ranks
    if not writes:
        group.exchange()  # rank 0's writes, below: their failure is every rank's
        return report
    pending = None if onnx_path is None else prepare(runner, onnx_path, fold=fold, to_onnx=True, data=stream,
                                                      data_options=data_opts, source_path=source)
    if source is not None:
        report.input, report.output = str(source), str(output)
        if pending is not None:  # the export already hashed the input: a checkpoint can be gigabytes
            report.input_sha256 = pending.report.input_sha256
        else:
            report.input_sha256 = sha256(source) if source.is_file() else None
        runner.save(output, [bn.id for bn in outcome.layers])
    with removed_on_failure(output if source is not None else None):
        if source is not None:
            report.output_sha256 = sha256(output) if output.is_file() else None
        if pending is not None:  # the ONNX names the checkpoint it was exported from and how it was repaired
            pending.write({"bnrepair.repaired_sha256": report.output_sha256 or "",
                           "bnrepair.recalibrated": json.dumps({"mode": loop.mode, "samples": report.samples,
                                                                "seed": stream.seed, "passes": report.passes})})
            report.export = pending.report
        if group is not None:
            group.exchange()
    return report


def refuse_unfoldable(runner: Runner, source: Path | None) -> None:
    """Before any data is read: a format that folds nothing, or a model its folder cannot fold."""
    reason = runner.folder().unfoldable(runner.model)
    if reason:
        raise InputError(f"{source or 'model'}: {reason}")


def inspect(model, options: LoadOptions | None = None, **load_options) -> InspectReport:
    """What the checkpoint's stored statistics and settings say, without any data."""
    runner = load(model, options, **load_options)
    calls = runner.call_counts()
    return InspectReport(runner.framework, runner.graph.source, runner.graph.bn_layers,
                         inspect_layers(runner.graph, calls),
                         decays=[runner.graph.decay(bn) for bn in runner.graph.bn_layers])


def decoded_once(stream, mode: str, cache_mb: float | None, progress: Progress | None):
    """``stream``, or in eval mode (several passes) its batches kept in memory when they are images to decode
    and fit ``cache_mb`` (default a quarter of the memory available)."""
    from .untrusted import available_memory

    if mode != "eval" or not isinstance(stream, Calibration) or not isinstance(stream.source, ImageFolder):
        return stream
    budget = cache_mb * 2**20 if cache_mb is not None else (available_memory() or 0) / 4
    return Cached(stream, progress) if budget > 0 and stream.decoded_bytes() <= budget else stream


@across_ranks
def diagnose(model, data, *, threshold: float = 0.5, device: str = "auto", progress: Progress | None = None,
             process_group=None, options: LoadOptions | None = None, data_options: DataOptions | None = None,
             recalibration: RecalibrationOptions | None = None, **given) -> DiagnoseReport:
    """Compare stored statistics with what ``data`` produces, and predict what a recalibration gives back.

    The data is read once (at most ``samples``, default ``DIAGNOSE_SAMPLES``) and kept in memory for the passes:
    inference and training-mode predictions with the stored statistics, the inference-consistent statistics
    (``--mode eval``'s fixed point) that the stored ones are compared with, then a recalibration in ``mode``
    exactly as ``recalibrate`` would do it, whose predictions give the expected gain. Options come as for
    ``recalibrate``. Nothing is written. In a process group (see ``recalibrate``) the ranks share the samples
    out, every pass and every prediction is merged across them, and every rank returns the same report.
    """
    if data_options is None:
        given.setdefault("samples", DIAGNOSE_SAMPLES)
    load_opts, data_opts, loop = grouped(given, (LoadOptions, options), (DataOptions, data_options),
                                         (RecalibrationOptions, recalibration))
    group = process_group or None  # resolved by ``across_ranks``
    if not threshold > 0:  # NaN would call every layer healthy
        raise InputError(f"--threshold must be a positive number, got {threshold}")
    started = time.perf_counter()
    _checked_request(data, data_opts, loop.mode, device)
    runner = load(model, load_opts, device=device)
    stream = calibration(data, image_spec(runner.graph, data_opts), data_opts, share_of(group))
    check_fits(runner.graph, stream)
    cached = Cached(stream, progress)
    count = len(cached) if group is None else int(group.gathered(np.array([len(cached)])).sum())
    if 2 <= count < DIAGNOSE_MIN_SAMPLES:  # fewer than 2 gets the loop's own message
        raise InputError(f"{cached.origin}: {count} samples are too few for a verdict: per-channel statistics "
                         f"of fewer than {DIAGNOSE_MIN_SAMPLES} samples differ from the stored ones by chance alone "
                         "(give more with --samples / --data)")
    stored = {bn.id: (bn.mean.copy(), bn.var.copy()) for bn in runner.graph.bn_layers}
    inference = as_scores_of(runner, cached, "eval", group)
    training = as_scores_of(runner, cached, "train", group)
    consistent = run(runner, cached, replace(loop, mode="eval", layers=None, skip=None), progress=progress,
                     group=group)
    runner.set_stats(stored)
    recalibrated = run(runner, cached, replace(loop, layers=None, skip=None), progress=progress,
                       group=group)
    after = as_scores_of(runner, cached, "eval", group)
    runner.set_stats(stored)
    evidence = [compare(replace(bn, mean=stored[bn.id][0], var=stored[bn.id][1]), *consistent.after[bn.id],
                        threshold) for bn in consistent.layers]
    command = (fix_command(model, data, device, load_opts, data_opts, loop) if source_like(model, data)
               else "bnrepair.recalibrate(model, data)")
    labels = np.concatenate([b.labels for b in cached]) if cached.has_labels else None
    if group is not None and group.every(labels is not None):
        labels = group.gathered(labels).astype(int)
    outputs = output_evidence(inference, training, after, labels)
    return DiagnoseReport(framework=runner.framework, source=runner.graph.source, samples=count,
                          threshold=threshold, mode=loop.mode,
                          passes=recalibrated.passes + consistent.passes + 3,
                          seconds=time.perf_counter() - started, layers=evidence,
                          verdicts=verdicts(runner.graph, evidence, command, outputs),
                          flags=inspect_layers(runner.graph), outputs=outputs,
                          run=recorded(data, device, runner.graph, load_opts, data_opts, loop))


def recorded(data, device, graph, *groups) -> dict:
    """What a report keeps to let the run be repeated: the data as named (a path, a --data-fn, else its type),
    the device, every option group's values, and the preprocessing images got and where it came from."""
    named = (data.spec if isinstance(data, DataFunction) else str(data) if isinstance(data, (str, Path))
             else None if data is None else type(data).__name__)
    data_options = next((g for g in groups if isinstance(g, DataOptions)), DataOptions())
    return {"data": named, "device": str(device), **{group.KEYWORD: group.recorded() for group in groups},
            "preprocessing": preprocessing(graph, data_options, data)}


def fix_command(model, data, device, load: LoadOptions, data_options: DataOptions,
                loop: RecalibrationOptions) -> str:
    """The ``bnrepair recalibrate`` command that repairs what diagnose found: the run's own options again (the
    samples diagnose read only where they were chosen: a recalibration takes every sample by default)."""
    import shlex

    named = ["--data-fn", data.spec] if isinstance(data, DataFunction) else ["--data", str(data)]
    words = [str(model), *named, *(["--mode", loop.mode] if loop.mode != "train" else []),
             *(["--device", str(device)] if device != "auto" else []),
             *data_options.as_argv(DataOptions(samples=DIAGNOSE_SAMPLES)), *load.as_argv()]
    return "bnrepair recalibrate " + shlex.join(words)


def as_scores_of(runner: Runner, data, mode: str, group=None) -> np.ndarray:
    """Prediction scores for every sample (of every rank of ``group``, in rank order)."""
    scores = [as_scores(runner.infer(runner.cast_input(b.inputs), mode)) for b in data]
    if group is None:
        return np.concatenate(scores)
    return group.gathered(np.concatenate(scores) if scores else np.zeros((0, 0)))


def source_like(model, data) -> bool:
    """Whether a command line can name both (a ``--data-fn`` too)."""
    return isinstance(model, (str, Path)) and isinstance(data, (str, Path, DataFunction))


def export_target(source: Path | None, export, fold: bool, output: Path | None) -> Path | None:
    """The ONNX path of ``recalibrate(..., export=...)``, checked before any work is done."""
    if export is None:
        if fold:
            raise InputError("--fold folds BN into the exported ONNX model: give --export PATH too")
        return None
    export = onnx_output(source, export)
    if output is not None and export.resolve() == output.resolve():
        raise InputError(f"{export}: --export and -o/--output name the same file; the ONNX model would replace "
                         "the recalibrated checkpoint")
    return export


def onnx_output(source: Path | None, output) -> Path:
    output = Path(output)
    if output.suffix != ".onnx":
        raise InputError(f"{output}: an ONNX export is written to a .onnx file")
    return check_output(source, output)


def fold(model, output=None, *, data=None, device: str = "auto", options: LoadOptions | None = None,
         data_options: DataOptions | None = None, verify: VerifyOptions | None = None, **given) -> DeployReport:
    """Fold every BN layer that folds exactly into its conv / dense neighbour, verify, and write.

    ``output``: ``.h5`` / ``.keras`` (Keras), ``.pt2`` (torch) or ``.onnx``; default for a path
    ``<stem>.folded<suffix>`` (``.pt2`` for torch); for an in-memory model nothing is written unless
    given. The folded model is also returned in memory as ``report.model``. Verified on ``data`` (or
    generated inputs of the declared shape) against the source; beyond ``atol``/``rtol`` it raises
    and writes nothing. Options come as groups (``verify``: ``VerifyOptions``, whose ``samples`` are the ones
    verified on) or as their fields by keyword.
    """
    verify, data_opts, load_opts = grouped(given, (VerifyOptions, verify), (DataOptions, data_options),
                                           (LoadOptions, options))
    source = Path(model) if isinstance(model, (str, Path)) else None
    if output is not None:
        output = check_output(source, Path(output))
    if output is not None and output.suffix == ".onnx":
        require_onnx()
        check_opset(verify.opset)
    elif output is not None and source is not None:  # the format's suffixes are known before it loads
        name = frameworks.detect(source)
        if frameworks.wing(name).FOLDS_TO:
            check_fold_suffix(output, name)
    if data is not None:
        _checked_request(data, data_opts)
    runner = load(model, load_opts, device=device)
    refuse_unfoldable(runner, source)  # before the verification batches are read
    suffixes = frameworks.wing(runner.framework).FOLDS_TO
    if output is None and source is not None:
        suffix = source.suffix if source.suffix in suffixes else suffixes[0]
        output = check_output(source, default_output(source, "folded").with_suffix(suffix))
    if output is not None and output.suffix != ".onnx":
        check_fold_suffix(output, runner.framework)
    pending = prepare(runner, output, fold=True, to_onnx=output is not None and output.suffix == ".onnx",
                      data=data, data_options=data_opts, verify=verify, source_path=source)
    pending.report.run = recorded(data, device, runner.graph, load_opts, data_opts, verify)
    pending.write()
    return pending.report


def check_fold_suffix(output: Path, framework: str) -> None:
    suffixes = frameworks.wing(framework).FOLDS_TO
    if output.suffix not in suffixes:
        raise InputError(f"{output}: a folded {framework} model is written as {', '.join(suffixes)} or .onnx")


def export(model, output, *, fold: bool = False, data=None, device: str = "auto", options: LoadOptions | None = None,
           data_options: DataOptions | None = None, verify: VerifyOptions | None = None, **given) -> DeployReport:
    """Write ``model`` as ONNX (dynamic batch axis, provenance in ``metadata_props``), BN folded first
    with ``fold``; verified in onnxruntime against the source before anything is written. Options as for
    ``fold``."""
    verify, data_opts, load_opts = grouped(given, (VerifyOptions, verify), (DataOptions, data_options),
                                           (LoadOptions, options))
    source = Path(model) if isinstance(model, (str, Path)) else None
    output = onnx_output(source, output)
    require_onnx()
    check_opset(verify.opset)  # before a framework loads (seconds, for TensorFlow)
    if data is not None:
        _checked_request(data, data_opts)
    runner = load(model, load_opts, device=device)
    pending = prepare(runner, output, fold=fold, to_onnx=True, data=data, data_options=data_opts, verify=verify,
                      source_path=source)
    pending.report.run = recorded(data, device, runner.graph, load_opts, data_opts, verify)
    pending.write()
    return pending.report


__all__ = ["diagnose", "export", "fold", "inspect", "load", "recalibrate"]
