"""The recalibration loop, shared by every framework: stream batches, pool moments, set statistics.

``train`` (PreciseBN): BN layers normalise with each batch's own statistics while their inputs are
measured, one pass. ``eval``: everything in inference mode; repeated passes, statistics set between
them, reach the inference-consistent fixed point (the statistics that inference itself produces); we
stop when the largest change, in units of the new standard deviation, is below ``tol``. Pooled moments
are exact, so the fixed point does not depend on batch size or order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import BnrepairError, InputError
from .graph import BNLayer
from .moments import Moments
from .protocols import NoProgress, Progress, Runner, Stream

MODES = ("train", "eval")
MAX_PASSES = 50
"""eval mode's default limit on passes, the PreciseBN start included"""


@dataclass
class Outcome:
    before: dict[str, tuple[np.ndarray, np.ndarray]]
    after: dict[str, tuple[np.ndarray, np.ndarray]]
    layers: list[BNLayer]
    samples: int
    passes: int
    converged: bool
    seconds: float
    change_per_pass: list[float] = field(default_factory=list)


def pooled_moments(runner: Runner, data: Stream, mode: str, ids: list[str], progress: Progress,
                   index: int = 0, iterating: bool = False) -> tuple[dict[str, Moments], int]:
    """One pass over ``data``: every chosen layer's input moments, pooled exactly over all samples."""
    totals = {i: Moments(0, np.zeros(()), np.zeros(())) for i in ids}
    seen = 0
    progress.start_pass(index, len(data) or None)
    for batch in data:
        collected = runner.collect(runner.cast_input(batch.inputs), mode, ids)
        for layer_id, m in collected.items():
            totals[layer_id] = totals[layer_id].merge(m)
        seen += batch.size
        progress.advance(batch.size)
    progress.end_pass()
    origin = data.origin
    if seen < 2:
        raise InputError(f"{origin}: need at least 2 calibration samples, got {seen}")
    for layer_id, m in totals.items():
        if not m.is_finite() and iterating:  # the first pass was finite: the iteration, not the data, overflowed
            raise BnrepairError(f"--mode eval: pass {index + 1} overflowed in BN layer {layer_id} while deeper layers "
                                "still normalised with statistics of the previous pass; use --mode train")
        if not m.is_finite():
            raise InputError(f"{origin}: BN layer {layer_id}: the data gives NaN or infinite activations "
                             "(check the data's scaling with --preprocess)")
    return totals, seen


def relative_change(old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], eps: float) -> float:
    """Largest change of mean or variance, in units of the new std / variance as the layer normalises with
    them (eps included): a dead channel (variance 0) cannot make a tiny change look huge."""
    scale = np.asarray(new[1], np.float64) + eps
    return float(max(np.max(np.abs(new[0] - old[0]) / np.sqrt(scale)), np.max(np.abs(new[1] - old[1]) / scale)))


def run(runner: Runner, data: Stream, mode: str = "train", tol: float = 1e-4, layers: str | None = None,
        skip: str | None = None, progress: Progress | None = None, max_passes: int | None = None) -> Outcome:
    """Recompute the chosen layers' statistics from ``data`` and set them on ``runner``.

    ``eval`` starts its fixed point from the train-mode (PreciseBN) statistics of a first pass: stored
    statistics may be broken badly enough to overflow deep activations, and PreciseBN's are already close
    to the fixed point, so few passes follow. It stops when a pass moves nothing more than ``tol``, or
    after ``max_passes`` passes in all (``Outcome.converged`` says which).
    """
    if mode not in MODES:
        raise BnrepairError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not tol >= 0:  # NaN too: no pass would ever count as converged
        raise BnrepairError(f"--tol must be a number >= 0, got {tol}")
    max_passes = MAX_PASSES if max_passes is None else max_passes
    if mode == "eval" and max_passes < 2:
        raise BnrepairError(f"--max-passes must be at least 2 in eval mode (a start and a check), got {max_passes}")
    chosen = runner.graph.select(layers, skip)
    ids = [bn.id for bn in chosen]
    eps = {bn.id: bn.eps for bn in chosen}
    unbiased = runner.graph.unbiased_var
    before = {bn.id: (bn.mean.copy(), bn.var.copy()) for bn in chosen}
    progress = progress or NoProgress()
    start = time.perf_counter()
    limit = 1 if mode == "train" else max_passes
    current, changes, converged, samples = dict(before), [], mode == "train", 0
    for index in range(limit):
        pass_mode = "train" if index == 0 else mode
        totals, samples = pooled_moments(runner, data, pass_mode, ids, progress, index, iterating=index > 0)
        new = {i: (m.mean, m.variance(unbiased)) for i, m in totals.items()}
        runner.set_stats(new)
        changes.append(max(relative_change(current[i], new[i], eps[i]) for i in ids))
        current = new
        if mode == "eval" and index > 0 and changes[-1] < tol:
            converged = True
            break
    return Outcome(before, current, chosen, samples, len(changes), converged,
                   time.perf_counter() - start, changes)
