"""Fold and export with proof: the result runs against the source on real batches before anything is written.

The source runs in its own framework; the folded model in the same framework; the ONNX file in
onnxruntime. Every output, and the output of every folded layer, must agree with the source within
``atol + rtol * scale``, the scale being the largest |value| of that output or layer in the source
(``Error``), or nothing is written. Deep in a network a folded layer may differ by more, as float32's own
rounding does there (``_fold_rows`` measures it), but never by a wrong fold's margin.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .data import calibration, check_fits, image_spec
from .errors import BnrepairError, InputError, VerificationError, first_line
from .frameworks.onnx_runtime import OPSET_MIN, onnx_session, ort_max_opset
from .options import DataOptions, VerifyOptions
from .protocols import Exporter, Folder, Runner
from .recalibration import nudged
from .report import Check, DeployReport, FoldRow, Refusal
from .version import __version__
from .writers import atomic_path, sha256


@dataclass
class Prepared:
    """A verified result not yet on disk: ``write(props)`` puts it at ``report.output`` atomically, an ONNX
    with ``props`` added to its provenance (what only the caller knows: the repaired checkpoint's digest)."""

    report: DeployReport
    write: Callable[..., None]


class Error:
    """Running comparison of one output (or one folded layer) over batches.

    The allowed difference scales with the values compared: ``atol + rtol * scale``, where ``scale`` is the
    largest |value| of that output or layer in the source. float32 arithmetic errs relative to the size of
    the numbers it accumulates, not to each element (a value near 0 in a layer of magnitude 10 carries the
    same absolute error as its neighbours), while a wrong fold (a wrong eps, a swapped channel) moves whole
    channels by a sizeable fraction of the scale.
    """

    def __init__(self, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol
        self.abs = self.scale = 0.0

    def add(self, ref, got, what: str) -> None:
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        if ref.shape != got.shape:
            raise VerificationError(f"verification failed: {what} has shape {got.shape}, the source {ref.shape}; "
                                    "nothing written")
        diff = np.abs(got - ref)
        largest = float(np.max(diff)) if diff.size else 0.0
        self.abs = max(self.abs, largest if np.isfinite(largest) else np.inf)
        self.scale = max(self.scale, float(np.max(np.abs(ref))) if ref.size else 0.0)

    @property
    def ok(self) -> bool:
        return self.abs <= self.atol + self.rtol * self.scale

    @property
    def rel(self) -> float:
        return self.abs / self.scale if self.scale else (np.inf if self.abs else 0.0)


def prepare(runner: Runner, output: Path | None, *, fold: bool, to_onnx: bool, data=None,
            data_options: DataOptions = DataOptions(), verify: VerifyOptions = VerifyOptions(),
            source_path: Path | None = None) -> Prepared:
    """Fold and/or convert ``runner``'s model, verify it against the source, and return it unwritten."""
    started = time.perf_counter()
    exporter, folder = runner.exporter(), runner.folder() if fold else None
    if to_onnx:
        check_opset(verify.opset, exporter)
    batches, described = verification_batches(runner, data, replace(data_options, samples=verify.samples))
    with exporter.precise():
        try:
            report, model, proto = _verified(runner, exporter, folder, output, batches, described,
                                             to_onnx=to_onnx, verify=verify, source_path=source_path)
        except BnrepairError as exc:  # the model's own problems: name its file, as every bad-input message does
            if source_path is None:
                raise
            raise type(exc)(f"{source_path}: {exc}") from None
    report.seconds = time.perf_counter() - started

    def write(props: dict[str, str] | None = None) -> None:
        if output is None:
            return
        if proto is not None:
            if props:
                _add_props(proto, props)
            with atomic_path(Path(output)) as tmp:
                tmp.write_bytes(proto.SerializeToString())
        else:
            folder.save(model, Path(output), batches[0])
        report.output_sha256 = sha256(output)

    return Prepared(report, write)


def _verified(runner: Runner, exporter: Exporter, folder: Folder | None, output: Path | None,
              batches: list[np.ndarray], described: str, *, to_onnx: bool, verify: VerifyOptions,
              source_path: Path | None):
    """The folded model and/or ONNX proto, each compared with the source on ``batches``."""
    source = exporter.source(runner.model)
    try:
        reference = [exporter.run(source, x) for x in batches]
        moved = [nudged(x, np.random.default_rng(i)) for i, x in enumerate(batches)]  # float32's own error
        noise = [exporter.run(source, x) for x in moved]
    except (RuntimeError, TypeError, ValueError) as exc:  # several inputs, or data of another shape
        text = first_line(exc)
        raise InputError(f"the model does not run on one input batch of shape {batches[0].shape}: {text}") from None
    if not all(np.isfinite(out).all() for outputs in reference for out in outputs):
        raise InputError("the model's own outputs hold NaN or infinite values on the verification inputs, so "
                         "nothing can be verified; `bnrepair inspect` flags BN statistics that cause this")
    model, rows, refused, checks = source, [], [], []
    if folder is not None:
        folded = folder.fold(runner.model, {bn.id for bn in runner.graph.bn_layers}, batches[0])
        model = folded.model
        rows, refused = _fold_rows(folder, source, folded, batches, moved, verify)
        checks += _compare("fold", reference, noise, [exporter.run(model, x) for x in batches],
                           exporter.output_names(model, batches[0]), verify)
    report = DeployReport(framework=runner.framework, source=runner.graph.source,
                          output=str(output) if output else None, folded=rows, refused=refused, checks=checks,
                          samples=sum(len(x) for x in batches), inputs=described, atol=verify.atol, rtol=verify.rtol)
    report.model = model
    if source_path is not None and Path(source_path).is_file():
        report.input_sha256 = sha256(source_path)
    proto = None
    if to_onnx:
        proto = exporter.to_onnx(model, batches[0], verify.opset)
        _label(proto, report)
        session = onnx_session(proto.SerializeToString())
        names = [o.name for o in session.get_outputs()]
        got = [session.run(None, {session.get_inputs()[0].name: x}) for x in batches]
        report.checks += _compare("onnx", reference, noise, got, names, verify)
        report.opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))  # as written
        report.provider = session.get_providers()[0]
    return report, model, proto


def verification_batches(runner, data, options: DataOptions) -> tuple[list[np.ndarray], str]:
    """Up to ``options.samples`` inputs: from ``data`` when given, else uniform [0, 1) of the declared shape (an
    image's height and width from ``--image-size`` where the model leaves them open)."""
    samples, batch_size = options.samples, options.batch_size
    if data is None:
        shape = runner.graph.input_shape
        if options.image_size and (shape is None or len(shape) == 3):
            spec = image_spec(runner.graph, options)
            shape = (spec.channels, *spec.size) if runner.graph.channels_first else (*spec.size, spec.channels)
        if not shape or any(d is None for d in shape):
            raise InputError(f"the model does not declare its full input shape ({shape}); give --data to "
                             "verify on real samples, or --image-size H W for an image model")
        x = np.random.default_rng(options.seed).random((samples, *shape), dtype=np.float32)
        return [x[i:i + batch_size] for i in range(0, samples, batch_size)], "generated uniform [0, 1) inputs"
    stream = calibration(data, image_spec(runner.graph, options), replace(options, skip_bad=False))
    check_fits(runner.graph, stream)
    batches, taken = [], 0
    for batch in stream:
        x = batch.inputs
        if isinstance(x, (dict, tuple, list)):
            raise InputError("verification takes batches of one input array; dict or tuple inputs are not supported")
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        batches.append(x[:samples - taken].astype(np.float32, copy=False))
        taken += len(batches[-1])
        if taken >= samples:
            break
    if not batches:
        raise InputError("the calibration data yielded no samples to verify with")
    return batches, "calibration data"


WRONG = 1e-3
"""a relative difference no rounding reaches: a wrong fold (a channel moved) always fails"""


def _fold_rows(folder, source, folded, batches, moved, verify: VerifyOptions) -> tuple[list[FoldRow], list[Refusal]]:
    """Per folded BN: the largest difference between its output in the source and the folded layer's, and float32's
    own error there: how far the source's layer moves when its input moves by two ulps (``moved``: the batches so
    nudged). A correct fold changes only rounding, which accumulates through a deep network as that perturbation
    does (``within``)."""
    pairs = folded.probes
    errors = {bn: Error(verify.atol, verify.rtol) for bn in pairs}
    noise = {bn: Error(verify.atol, verify.rtol) for bn in pairs}
    sources, targets = {s for p in pairs.values() for s, _, _ in p}, {f for p in pairs.values() for _, _, f in p}
    for x, off_x in zip(batches, moved):
        before, off_before = (folder.capture(source, sources, v) for v in (x, off_x))
        after = folder.capture(folded.model, targets, x)
        for bn, probe in pairs.items():
            for src, part, dst in probe:
                ref, off = ((v[src] if part is None else np.take(v[src], range(part[1], part[2]), axis=part[0]))
                            for v in (before, off_before))
                errors[bn].add(ref, after[dst], f"layer {dst}")
                noise[bn].add(ref, off, f"layer {src}")
    rows, refused = [], []
    for d in folded.decisions:
        if d.how is None:
            refused.append(Refusal(d.bn, d.reason))
            continue
        error, yardstick = errors[d.bn], noise[d.bn].abs
        rows.append(FoldRow(d.bn, d.how, folded.tensors[d.bn], error.abs, error.rel, yardstick))
        if not within(error, yardstick, verify):
            raise _off(f"folded layer {d.bn}", error, "fold", yardstick, verify)
    return rows, refused


def _compare(stage: str, reference, noise, results, names: list[str], verify: VerifyOptions) -> list[Check]:
    """Each output of ``results`` against the source's, float32's own error (``noise``: the source on inputs moved
    by two ulps) the yardstick beyond ``atol + rtol * scale``, as for folded layers."""
    count = len(reference[0])
    if any(len(r) != count for r in results) or len(names) != count:
        raise VerificationError(f"verification failed: the {stage} result has {len(results[0])} output(s), "
                                f"the source {count}")
    errors = [Error(verify.atol, verify.rtol) for _ in range(count)]
    yardsticks = [Error(verify.atol, verify.rtol) for _ in range(count)]
    for ref, moved, got in zip(reference, noise, results):
        for i in range(count):
            errors[i].add(ref[i], got[i], f"output {names[i]} ({stage})")
            yardsticks[i].add(ref[i], moved[i], f"output {names[i]} (source)")
    checks = [Check(name, stage, e.abs, e.rel, y.abs) for name, e, y in zip(names, errors, yardsticks)]
    for name, error, yardstick in zip(names, errors, yardsticks):
        if not within(error, yardstick.abs, verify):
            raise _off(f"output {name}", error, stage, yardstick.abs, verify)
    return checks


def within(error: Error, yardstick: float, verify: VerifyOptions) -> bool:
    """Within ``atol + rtol * scale``, or within ``--noise-margin`` times float32's own error while under
    ``WRONG``."""
    return error.ok or (error.abs <= verify.noise_margin * yardstick and error.rel < WRONG)


def _off(what: str, error: Error, stage: str, yardstick: float, verify: VerifyOptions) -> VerificationError:
    return VerificationError(f"verification failed ({stage}): {what} differs from the source by up to "
                             f"{error.abs:.3g} (relative {error.rel:.3g}), beyond atol {error.atol:g} + "
                             f"rtol {error.rtol:g} * its largest |value| {error.scale:.3g} and beyond "
                             f"{verify.noise_margin:g} x float32's own error there ({yardstick:.3g}); nothing "
                             "written")


def check_opset(opset: int, exporter: Exporter | None = None) -> None:
    """Up to the newest opset that the installed onnx, onnxruntime and the framework's exporter all take;
    without ``exporter``, onnx and onnxruntime only (checked before a framework loads)."""
    import onnx

    newest = min(onnx.defs.onnx_opset_version(), ort_max_opset(), *([exporter.max_opset()] if exporter else []))
    if not OPSET_MIN <= opset <= newest:
        raise InputError(f"--opset must be between {OPSET_MIN} and {newest} (the newest the installed onnx, "
                         f"onnxruntime and exporter all support), got {opset}")


def _add_props(proto, props: dict[str, str]) -> None:
    import onnx

    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **props})


def _label(proto, report: DeployReport) -> None:
    """Provenance in ``metadata_props`` (the graph keeps no trace of a folded BN), then ``onnx.checker``."""
    import onnx

    props = {"bnrepair.version": __version__, "bnrepair.source": Path(report.source).name,
             "bnrepair.source_sha256": report.input_sha256 or "",
             "bnrepair.folded": json.dumps({row.bn: row.into for row in report.folded}),
             "bnrepair.refused": json.dumps({r.bn: r.reason for r in report.refused})}
    _add_props(proto, props)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"the exported model fails onnx.checker: {first_line(exc)}") from None
