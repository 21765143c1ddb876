"""The Python API; the CLI is a thin layer over these functions.

``recalibrate`` takes a checkpoint path (and writes a repaired copy) or a model already in memory
(a ``keras.Model``, a ``torch.nn.Module``; its statistics are updated in place, the way
``torch.optim.swa_utils.update_bn`` does), plus calibration data: a path, an array, or any
re-iterable of batches.
"""

from __future__ import annotations

from pathlib import Path


from . import frameworks
from .data import ImageSpec, calibration
from .data.sources import ArraySource, ImageFolder
from .errors import InputError
from .recalibrate import Progress, run
from .report import Report
from .writers import check_output, default_output, sha256


def load(model, **options):
    """A runner for a checkpoint path or an in-memory model (see DESIGN.md, runner protocol)."""
    if hasattr(model, "graph") and hasattr(model, "collect"):
        return model
    if isinstance(model, (str, Path)):
        return frameworks.load(Path(model), **options)
    return frameworks.wrap(model, **options)


def image_spec(graph, image_size=None, preprocess: str = "unit") -> ImageSpec:
    """How images must be decoded for this model: its declared input size, channels and layout."""
    shape = graph.input_shape
    channels, size = 3, None
    if shape is not None and len(shape) == 3:
        c, h, w = shape if graph.channels_first else (shape[2], shape[0], shape[1])
        channels = c or 3
        if h and w:
            size = (h, w)
    if image_size:
        size = tuple(int(v) for v in image_size)
    return ImageSpec(size=size, channels=channels, preprocess=preprocess, channels_first=graph.channels_first)


def check_fits(graph, data) -> None:
    """Fail early, naming the file, when the samples cannot be the model's input."""
    shape = graph.input_shape
    source = getattr(data, "source", None)
    if shape is None or source is None:
        return
    if isinstance(source, ImageFolder) and len(shape) != 3:
        raise InputError(f"{source.root}: image folder given, but the model takes inputs of shape {shape}")
    if isinstance(source, ArraySource):
        got = source.sample_shape
        if len(got) != len(shape) or any(want is not None and want != have for want, have in zip(shape, got)):
            raise InputError(f"{source.origin}: samples have shape {got}, the model takes {shape}")


def recalibrate(model, data, *, output=None, mode: str = "train", batch_size: int = 32, seed: int = 0,
                samples: int | None = None, tol: float = 1e-4, layers: str | None = None,
                skip: str | None = None, device: str = "auto", image_size=None, preprocess: str = "unit",
                skip_bad: bool = False, input_index: int = 0, progress: Progress | None = None,
                max_passes: int | None = None, **load_options) -> Report:
    """Recompute every chosen BN layer's statistics from ``data``; returns the report.

    With a path, the repaired checkpoint goes to ``output`` (default ``<stem>.recalibrated<suffix>``)
    and the input is never modified; with an in-memory model, the model itself is updated.
    """
    source = Path(model) if isinstance(model, (str, Path)) else None
    if source is not None:
        output = check_output(source, Path(output) if output else default_output(source))
    runner = load(model, device=device, **load_options)
    stream = calibration(data, image_spec(runner.graph, image_size, preprocess), batch_size, seed,
                         samples, skip_bad, input_index)
    check_fits(runner.graph, stream)
    outcome = run(runner, stream, mode, tol, layers, skip, progress, max_passes)
    report = Report.of(outcome, runner.framework, mode, str(runner.device), stream.seed,
                       skipped_bad=len(stream.bad))
    if source is not None:
        runner.save(output, [bn.id for bn in outcome.layers])
        report.input, report.output = str(source), str(output)
        report.input_sha256 = sha256(source) if source.is_file() else None
        report.output_sha256 = sha256(output) if output.is_file() else None
    return report


__all__ = ["load", "recalibrate"]
