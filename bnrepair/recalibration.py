"""The recalibration loop, shared by every framework: stream batches, pool moments, set statistics.

``train`` (PreciseBN): BN layers normalise with each batch's own statistics while their inputs are
measured, one pass. ``eval``: repeated passes, statistics set between them, reach the
inference-consistent fixed point (the statistics that inference itself produces); we stop when the
largest change, in units of the new standard deviation, is below ``tol``. Pooled moments are exact, so
the fixed point does not depend on batch size or order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .distributed import Group, together
from .drift import Drift
from .errors import BnrepairError, InputError
from .graph import BNLayer
from .moments import Moments, relative_change
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
    """passes made over the data (a pass made again with batch statistics after an overflow counts twice)"""
    converged: bool
    seconds: float
    change_per_pass: list[float] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    """layers the forward pass never reached (in inference mode): left as they were"""
    noise_floor: float | None = None
    """eval mode, where passes stopped shrinking the change: how far a pass moves the statistics when they are
    perturbed by two float32 ulps (``perturbed``); the fixed point is not resolved finer than that"""
    estimated_error: float | None = None
    """eval mode, where it stopped after a drift-corrected pass: that pass's distance from the fixed point, as the
    last round's contraction predicts it (no plain pass checked it)"""


PERTURBATION = 2.0 ** -22
"""two float32 ulps, relative: what storing statistics in float32 already perturbs them by"""


def perturbed(stats: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {i: tuple(v * (1 + PERTURBATION * rng.choice([-1.0, 1.0], np.shape(v))) for v in pair)
            for i, pair in stats.items()}


def pooled_moments(runner: Runner, data: Stream, mode: str, ids: list[str], progress: Progress,
                   index: int = 0, batch_stats: frozenset = frozenset(), drift: Drift | None = None,
                   group: Group | None = None) -> tuple[dict[str, Moments], int]:
    """One pass over ``data``: every chosen layer's input moments, pooled exactly over all samples (of every
    rank of ``group``)."""
    totals = {i: Moments(0, np.zeros(()), np.zeros(())) for i in ids}
    seen = 0
    progress.start_pass(index, len(data) or None)
    with together(group):
        for number, batch in enumerate(data):
            inputs = runner.cast_input(batch.inputs)
            if drift is not None and drift.correcting:
                corrections = drift.corrections(number)
                moments = runner.collect(inputs, "eval", ids, frozenset(corrections), corrections)
            else:
                moments = runner.collect(inputs, mode, ids, batch_stats)
            if drift is not None:
                drift.record(number, moments)
            for layer_id, m in moments.items():
                totals[layer_id] = totals[layer_id].merge(m)
            seen += batch.size
            progress.advance(batch.size)
    progress.end_pass()
    if group is not None:
        totals, seen = group.merged(totals, ids, seen)
    if seen < 2:
        raise InputError(f"{data.origin}: need at least 2 calibration samples, got {seen}")
    return totals, seen


def statistics(totals: dict[str, Moments], ids: list[str], unbiased: bool) -> dict:
    """(mean, variance) per layer, the variance in the framework's convention, as ``set_stats`` takes them."""
    return {i: (totals[i].mean, totals[i].variance(unbiased)) for i in ids}


def first_non_finite(totals: dict[str, Moments], ids: list[str]) -> str | None:
    return next((i for i in ids if not totals[i].is_finite()), None)


def check_weights(runner: Runner) -> None:
    """A weight that is not finite (a diverged run, a damaged file) would turn activations NaN, which the data
    would be blamed for; it is named up front instead."""
    for name, value in runner.weights():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise InputError(f"{runner.graph.source}: weight {name} holds NaN or infinite values: the checkpoint "
                             "itself is damaged (a diverged training run?), which recalibrating BN statistics "
                             "cannot mend")


def run(runner: Runner, data: Stream, mode: str = "train", tol: float = 1e-4, layers: str | None = None,
        skip: str | None = None, progress: Progress | None = None, max_passes: int | None = None,
        group: Group | None = None) -> Outcome:
    """Recompute the chosen layers' statistics from ``data`` and set them on ``runner``.

    ``eval`` starts its fixed point from the train-mode (PreciseBN) statistics of a first pass: stored
    statistics may be broken badly enough to overflow deep activations, and PreciseBN's are a consistent
    start. Then plain passes (every layer in inference mode with the statistics of the pass before)
    alternate with drift-corrected ones (``drift``) where the runner and the stream allow, else plain
    passes only. It stops when a pass moves nothing more than ``tol`` (a corrected pass only if it also
    normalised within ``tol`` of plain inference), when a corrected pass is predicted within ``tol`` of
    the fixed point by the contraction the round before it showed (``Outcome.estimated_error``; saves the
    plain pass that would only confirm it), or after ``max_passes`` passes in all (``Outcome.converged``
    says which). A plain pass whose activations overflow (layers deep in the
    network still normalising with statistics that no longer fit their input) is made again with every
    layer after the settled ones, in forward order, normalising with batch statistics instead: the settled
    prefix stays exact, the rest cannot overflow, and the next pass tries inference mode again.

    Deep float32 nets cannot resolve the fixed point below some level (Keras's InceptionV3: 1.1e-4 std):
    when plain passes stop shrinking the change, one pass at statistics perturbed by two float32 ulps
    measures that level, and a change within twice it counts as converged (``Outcome.noise_floor``).

    With ``group`` (``distributed``), each rank streams its own share of the data and every pass is merged
    across the ranks, so every rank takes the same decisions and ends with the same statistics.
    """
    if mode not in MODES:
        raise BnrepairError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not tol >= 0:  # NaN too: no pass would ever count as converged
        raise BnrepairError(f"--tol must be a number >= 0, got {tol}")
    check_weights(runner)
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
    current, changes, converged, samples, passes = dict(before), [], mode == "train", 0, 0
    moved, unreached = {i: np.inf for i in ids}, []
    drift = Drift.of(runner, data, ids, eps) if mode == "eval" else None
    plain_before = False  # the pass before was a plain inference pass: a corrected one may follow
    plain_changes, floor, probe, estimate = [], None, None, None
    for index in range(limit):
        pass_mode = "train" if index == 0 else mode
        if drift is not None:
            drift.plan(plain_before, current)
        corrected = drift is not None and drift.correcting
        totals, samples = pooled_moments(runner, data, pass_mode, ids, progress, index, drift=drift,
                                         group=group)
        passes += 1
        guarded = frozenset()
        if index > 0 and not corrected and first_non_finite(totals, ids) is not None:
            settled = next((k for k, i in enumerate(ids) if moved[i] >= tol), len(ids))
            guarded = frozenset(ids[settled:])
            totals, samples = pooled_moments(runner, data, pass_mode, ids, progress, index, guarded,
                                             group=group)
            passes += 1
        if index == 0:
            unreached = [i for i in ids if totals[i].count == 0]
            if len(unreached) == len(ids):
                raise InputError(f"{data.origin}: the forward pass reaches none of the BN layers to recalibrate")
            ids = [i for i in ids if i not in unreached]  # left alone: inference never uses them either
            fits = drift is not None and drift.fits(ids)
            if drift is not None and not (fits if group is None else group.every(fits)):  # plain passes only
                drift = None
        if corrected and group is not None:
            drift.moved = group.largest(drift.moved)
        overflow = first_non_finite(totals, ids)
        if overflow is not None:
            raise InputError(f"{data.origin}: BN layer {overflow}: the data gives NaN or infinite activations "
                             "(check the data's scaling with --preprocess)")
        new = statistics(totals, ids, unbiased)
        runner.set_stats(new)
        moved = {i: relative_change(current[i], new[i], eps[i]) for i in ids}
        changes.append(max(moved.values()))
        current = {**current, **new}
        plain_before = index > 0 and not corrected and not guarded
        if plain_before and probe is not None:  # this pass ran at the statistics the probe perturbed
            floor, probe = max(relative_change(probe[i], new[i], eps[i]) for i in ids), None
        bound = max(tol, 2 * floor) if floor is not None else tol
        if (plain_before or corrected and drift.moved < tol) and changes[-1] < bound:
            converged = True
            break
        if corrected and len(plain_changes) > 1:
            # the plain pass after each corrected one measures how far its statistics still were from the
            # fixed point: their ratio is a round's contraction, and this round's result lies about that much
            # closer than the plain pass before it (rounds contract faster as they go: the estimate is high)
            rate = plain_changes[-1] / plain_changes[-2]
            predicted = rate * plain_changes[-1]
            if rate < 0.5 and predicted < bound:
                converged, estimate = True, predicted
                break
        if plain_before:
            plain_changes.append(changes[-1])
            if floor is None and len(plain_changes) > 2 and plain_changes[-1] > 0.5 * plain_changes[-2]:
                # passes no longer shrink the change: measure what float32 alone moves, with one more pass
                runner.set_stats(perturbed(new))
                totals, _ = pooled_moments(runner, data, mode, ids, progress, index, group=group)
                passes += 1
                probe = statistics(totals, ids, unbiased)
                runner.set_stats(new)
                plain_before = False  # the next pass is a plain one at ``new``, to compare the probe with
    return Outcome(before, current, [bn for bn in chosen if bn.id not in unreached], samples, passes, converged,
                   time.perf_counter() - start, changes, unreached, floor, estimate)
