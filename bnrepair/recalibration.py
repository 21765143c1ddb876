"""The recalibration loop, shared by every framework: stream batches, pool moments, set statistics.

``train`` (PreciseBN): BN layers normalise with each batch's own statistics while their inputs are
measured, one pass. ``eval``: repeated passes, statistics set between them, reach the
inference-consistent fixed point (the statistics that inference itself produces); we stop when the
largest change, in units of the new standard deviation, is below ``tol``. Pooled moments are exact, so
the fixed point does not depend on batch size or order.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from .data.stream import Joined
from .distributed import Group, together
from .drift import Drift
from .errors import BnrepairError, InputError
from .graph import BNLayer
from .moments import Moments, relative_change
from .options import RecalibrationOptions
from .protocols import NoProgress, Progress, Runner, Stats, Stream
from .untrusted import available_memory

MODES = ("train", "eval")
MAX_PASSES = 50
"""eval mode's default limit on passes, the PreciseBN start included"""
PEAK_PER_LARGEST_INPUT = 8
"""a forward's peak memory per sample, in float32 copies of its largest BN input: a layer's input, its output and
the reductions' temporaries, with a residual branch's input held beside them (a bound with room to spare)"""


class NotConverged(UserWarning):
    """eval mode stopped at its limit on passes before the statistics stopped moving."""


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
    eval_batch: int | None = None
    """eval mode: the most samples one forward of the passes after the start may take (``joined_size``)"""


PERTURBATION = 2.0 ** -22
"""two float32 ulps, relative: what storing a value in float32 already perturbs it by; how far a model moves
under it is float32's own error (eval mode's noise floor, verification's yardstick in ``deploy``)"""


def nudged(x, rng: np.random.Generator) -> np.ndarray:
    """``x`` with every element moved by ``PERTURBATION``, up or down at random, in its own dtype."""
    return (x * (1 + PERTURBATION * rng.choice([-1.0, 1.0], np.shape(x)))).astype(np.asarray(x).dtype)


def perturbed(stats: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {i: tuple(nudged(v, rng) for v in pair) for i, pair in stats.items()}


def pooled_moments(runner: Runner, data: Stream, mode: str, ids: list[str], progress: Progress, *,
                   index: int = 0, batch_stats: frozenset = frozenset(), drift: Drift | None = None,
                   group: Group | None = None) -> tuple[dict[str, Moments], int]:
    """One pass over ``data``: every chosen layer's input moments, pooled exactly over all samples (of every
    rank of ``group``); ``drift`` takes its own side of the pass (each batch's corrections and moments)."""
    totals = {i: Moments(0, np.zeros(()), np.zeros(())) for i in ids}
    seen = 0
    progress.start_pass(index, len(data) or None)
    with together(group):
        for number, batch in enumerate(data):
            inputs = runner.cast_input(batch.inputs)
            if drift is None:
                moments = runner.collect(inputs, mode, ids, batch_stats)
            else:
                moments = drift.collect(runner, inputs, number, mode, ids)
            for layer_id, m in moments.items():
                totals[layer_id] = totals[layer_id].merge(m)
            seen += batch.size
            progress.advance(batch.size)
    progress.end_pass()
    if group is not None:
        totals, seen = group.merged(totals, ids, seen)
        if drift is not None:
            drift.merge_moved(group)
    if seen < 2:
        raise InputError(f"{data.origin}: need at least 2 calibration samples, got {seen}")
    return totals, seen


def statistics(totals: dict[str, Moments], ids: list[str], unbiased: bool) -> dict:
    """(mean, variance) per layer, the variance in the framework's convention, as ``set_stats`` takes them."""
    return {i: (totals[i].mean, totals[i].variance(unbiased)) for i in ids}


def first_non_finite(totals: dict[str, Moments], ids: list[str]) -> str | None:
    return next((i for i in ids if not totals[i].is_finite()), None)


def joined_size(runner: Runner, totals: dict[str, Moments], ids: list[str], samples: int, given: int | None) -> int:
    """Samples per forward for eval mode's passes after the start: ``given``, else as many as a quarter of the
    memory available holds (the GPU's where the runner says, ``free_memory``; else the host's), at
    ``PEAK_PER_LARGEST_INPUT`` times the largest BN input the start measured (values per sample: count per
    channel over samples, times channels), and never more than there are samples."""
    if given is not None:
        return given
    largest = max(totals[i].count / samples * totals[i].mean.size for i in ids) * 4 * PEAK_PER_LARGEST_INPUT
    free = getattr(runner, "free_memory", lambda: None)()
    budget = (available_memory() if free is None else free) or 0
    return int(max(1, min(samples, budget / 4 // largest)))


def check_weights(runner: Runner) -> None:
    """A weight that is not finite (a diverged run, a damaged file) would turn activations NaN, which the data
    would be blamed for; it is named up front instead."""
    for name, value in runner.weights():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise InputError(f"{runner.graph.source}: weight {name} holds NaN or infinite values: the checkpoint "
                             "itself is damaged (a diverged training run?), which recalibrating BN statistics "
                             "cannot mend")


@dataclass
class Convergence:
    """When eval mode stops, from what each pass moved (in std units of the new statistics, eps included).

    A plain pass (every layer in inference mode at the statistics before it) ends the run when it moves nothing
    more than ``tol``; a drift-corrected one when it also normalised within ``tol`` of plain inference. The
    plain passes around a corrected one show a round's contraction, and a corrected pass it predicts within
    ``tol`` of the fixed point ends the run without the plain pass that would only confirm it (``estimate``;
    rounds contract faster as they go, so the estimate is high). When plain passes stop shrinking the change,
    one pass at statistics perturbed by two float32 ulps (``probe``) measures the model's float32 noise floor,
    and a change within twice it counts as converged.
    """

    tol: float
    eps: dict[str, float]
    changes: list[float] = field(default_factory=list)
    """the largest change of each pass"""
    plain: list[float] = field(default_factory=list)
    """the largest change of each plain pass that did not end the run"""
    moved: dict[str, float] = field(default_factory=dict)
    """each layer's change in the last pass"""
    last: str = "start"
    """the kind of the last pass: start, plain, corrected, guarded (made again on batch statistics) or probe"""
    probe: dict | None = None
    floor: float | None = None
    estimate: float | None = None

    @property
    def bound(self) -> float:
        return max(self.tol, 2 * self.floor) if self.floor is not None else self.tol

    def unsettled(self, ids: list[str]) -> frozenset[str]:
        """The layers from the first one (in forward order) that the last pass still moved by ``tol`` or more."""
        settled = next((k for k, i in enumerate(ids) if self.moved.get(i, np.inf) >= self.tol), len(ids))
        return frozenset(ids[settled:])

    def judge(self, kind: str, before: Stats, after: Stats, drift_moved: float = 0.0) -> bool:
        """A pass of ``kind`` moved the statistics ``before`` to ``after``; True when it ends the run."""
        self.moved = {i: relative_change(before[i], after[i], self.eps[i]) for i in after}
        self.changes.append(max(self.moved.values()))
        self.last = kind
        if kind == "plain" and self.probe is not None:  # this pass ran at the statistics the probe perturbed
            self.floor = max(relative_change(self.probe[i], after[i], self.eps[i]) for i in after)
            self.probe = None
        if (kind == "plain" or kind == "corrected" and drift_moved < self.tol) and self.changes[-1] < self.bound:
            return True
        if kind == "corrected" and len(self.plain) > 1:
            rate = self.plain[-1] / self.plain[-2]
            if rate < 0.5 and rate * self.plain[-1] < self.bound:
                self.estimate = rate * self.plain[-1]
                return True
        if kind == "plain":
            self.plain.append(self.changes[-1])
        return False

    def stalled(self) -> bool:
        """Plain passes no longer shrink the change, and the noise floor is not measured yet."""
        return (self.last == "plain" and self.floor is None and len(self.plain) > 2
                and self.plain[-1] > 0.5 * self.plain[-2])

    def probed(self, stats: Stats) -> None:
        """What a pass at perturbed statistics gave; the next pass is a plain one to compare it with."""
        self.probe, self.last = stats, "probe"


@dataclass
class Passes:
    """Passes over one stream for one runner, counted."""

    runner: Runner
    data: Stream
    progress: Progress
    group: Group | None
    made: int = 0
    """passes made over the data (a pass made again with batch statistics after an overflow counts twice)"""
    samples: int = 0

    def measure(self, mode: str, ids: list[str], index: int, **how) -> dict[str, Moments]:
        totals, self.samples = pooled_moments(self.runner, self.data, mode, ids, self.progress, index=index,
                                              group=self.group, **how)
        self.made += 1
        return totals


def run(runner: Runner, data: Stream, options: RecalibrationOptions | None = None, *,
        progress: Progress | None = None, group: Group | None = None, **given) -> Outcome:
    """Recompute the chosen layers' statistics from ``data`` and set them on ``runner``; ``options`` (or their
    fields by keyword) say how.

    ``eval`` starts its fixed point from the train-mode (PreciseBN) statistics of a first pass: stored
    statistics may be broken badly enough to overflow deep activations, and PreciseBN's are a consistent
    start. Then plain passes (every layer in inference mode with the statistics of the pass before)
    alternate with drift-corrected ones (``drift``) where the runner and the stream allow, else plain
    passes only, until ``Convergence`` says they are done or after ``max_passes`` passes in all
    (``Outcome.converged`` says which). A plain pass whose activations overflow (layers deep in the network
    still normalising with statistics that no longer fit their input) is made again with every layer after
    the settled ones, in forward order, normalising with batch statistics instead: the settled prefix stays
    exact, the rest cannot overflow, and the next pass tries inference mode again.

    With ``group`` (``distributed``), each rank streams its own share of the data and every pass is merged
    across the ranks, so every rank takes the same decisions and ends with the same statistics.
    """
    options = RecalibrationOptions.of(options, **given)
    mode, tol = options.mode, options.tol
    if mode not in MODES:
        raise BnrepairError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not tol >= 0:  # NaN too: no pass would ever count as converged
        raise BnrepairError(f"--tol must be a number >= 0, got {tol}")
    check_weights(runner)
    max_passes = MAX_PASSES if options.max_passes is None else options.max_passes
    if mode == "eval" and max_passes < 2:
        raise BnrepairError(f"--max-passes must be at least 2 in eval mode (a start and a check), got {max_passes}")
    if options.eval_batch_size is not None and options.eval_batch_size < 1:
        raise BnrepairError(f"--eval-batch-size must be at least 1, got {options.eval_batch_size}")
    chosen = runner.graph.select(options.layers, options.skip)
    ids = [bn.id for bn in chosen]
    eps = {bn.id: bn.eps for bn in chosen}
    unbiased = runner.graph.unbiased_var
    before = current = {bn.id: (bn.mean.copy(), bn.var.copy()) for bn in chosen}
    passes = Passes(runner, data, progress or NoProgress(), group)
    judge, unreached, done, eval_batch = Convergence(tol, eps), [], False, None
    drift = Drift.of(runner, data, ids, eps) if mode == "eval" else None
    start, limit = time.perf_counter(), 1 if mode == "train" else max_passes
    for index in itertools.count():
        if passes.made >= limit:  # a pass made again on batch statistics or a noise-floor probe counts too
            break
        corrected = drift is not None and drift.plan(judge.last == "plain", current)
        totals = passes.measure("train" if index == 0 else mode, ids, index, drift=drift)
        guarded = frozenset()
        if index > 0 and not corrected and first_non_finite(totals, ids) is not None:
            guarded = judge.unsettled(ids)
            totals = passes.measure(mode, ids, index, batch_stats=guarded)
        if index == 0:
            unreached = [i for i in ids if totals[i].count == 0]
            if len(unreached) == len(ids):
                raise InputError(f"{data.origin}: the forward pass reaches none of the BN layers to recalibrate")
            ids = [i for i in ids if i not in unreached]  # left alone: inference never uses them either
            if drift is not None and not drift.fits(ids, group):  # plain passes only
                drift = None
            if mode == "eval" and runner.graph.batch is None:
                eval_batch = joined_size(runner, totals, ids, passes.samples, options.eval_batch_size)
                passes.data = Joined(data, eval_batch)
        overflow = first_non_finite(totals, ids)
        if overflow is not None:
            raise InputError(f"{data.origin}: BN layer {overflow}: the data gives NaN or infinite activations "
                             "(check the data's scaling with --preprocess)")
        new = statistics(totals, ids, unbiased)
        runner.set_stats(new)
        kind = "start" if index == 0 else "corrected" if corrected else "guarded" if guarded else "plain"
        done = judge.judge(kind, current, new, drift.moved if corrected else 0.0)
        current = {**current, **new}
        if done:
            break
        if judge.stalled() and passes.made + 1 < limit:  # what float32 alone moves, where a pass can check it
            runner.set_stats(perturbed(new))
            judge.probed(statistics(passes.measure(mode, ids, index), ids, unbiased))
            runner.set_stats(new)
    return Outcome(before=before, after=current, layers=[bn for bn in chosen if bn.id not in unreached],
                   samples=passes.samples, passes=passes.made, converged=mode == "train" or done,
                   seconds=time.perf_counter() - start, change_per_pass=judge.changes, unreached=unreached,
                   noise_floor=judge.floor, estimated_error=judge.estimate, eval_batch=eval_batch)
