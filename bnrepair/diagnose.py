"""Checks and verdicts on BN statistics: pure numpy over the internal graph and collected moments.

``inspect_layers`` needs no data: it reads the stored statistics and settings. ``compare`` sets
the stored statistics against what the calibration data produces, and ``verdicts`` names the
causes of DESIGN.md's table with the evidence that supports each.

Definitions (per channel; σ²_data is the data's variance, ε the layer's eps):
  mean shift       |μ_data − μ_stored| / sqrt(σ²_data + ε)
  log var ratio    ln((σ²_stored + ε) / (σ²_data + ε))
  progress         how far the stored statistics moved from their initial values (0, 1) towards
                   the data's: 0 = never moved, 1 = arrived; a stale EMA sits well below 1.
A channel is off when its mean shift or |log var ratio| exceeds the threshold; a layer has a
problem when more than ``SHARE_OFF`` of its channels are off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .graph import BNLayer, ModelGraph

SHARE_OFF = 0.1
DEFAULT_EPS = {"keras": 1e-3, "savedmodel": 1e-3, "torch": 1e-5}


@dataclass
class Flag:
    level: str  # "error" | "warning" | "info"
    code: str
    message: str
    layer: str | None = None


def decay(graph: ModelGraph, bn: BNLayer) -> float | None:
    """The EMA's decay whatever the framework's convention (Keras: momentum; torch: 1 - momentum)."""
    if bn.momentum is None:
        return None
    return 1.0 - bn.momentum if graph.framework == "torch" else bn.momentum


def never_updated(bn: BNLayer) -> bool:
    return bool(np.all(bn.mean == 0.0) and np.all(bn.var == 1.0))


def inspect_layers(graph: ModelGraph, calls: dict[str, int] | None = None) -> list[Flag]:
    """What the stored statistics and settings alone say; ``calls``: forward calls per layer when known."""
    flags = []
    default_eps = DEFAULT_EPS.get(graph.framework)
    for bn in graph.bn_layers:
        if not bn.tracks_stats:
            flags.append(Flag("info", "no_running_stats", "keeps no running statistics (nothing to fix)", bn.id))
            continue
        if not (np.isfinite(bn.mean).all() and np.isfinite(bn.var).all()):
            flags.append(Flag("error", "non_finite", "stored statistics hold NaN or infinite values", bn.id))
        elif np.any(bn.var <= 0):
            flags.append(Flag("error", "non_positive_var", f"{int(np.sum(bn.var <= 0))} channel(s) have "
                              "variance <= 0", bn.id))
        elif np.any(bn.var < bn.eps):
            flags.append(Flag("warning", "var_below_eps", f"{int(np.sum(bn.var < bn.eps))} channel(s) have "
                              f"variance below eps={bn.eps:g}", bn.id))
        if never_updated(bn):
            flags.append(Flag("error", "never_updated", "statistics still at their initial values "
                              "(mean exactly 0, variance exactly 1): updates never ran", bn.id))
        d = decay(graph, bn)
        if d is not None and d >= 0.999:
            flags.append(Flag("warning", "slow_momentum", f"moving-average decay {d:g}: needs thousands of "
                              "steps to forget its initial values", bn.id))
        if default_eps and not default_eps / 100 <= bn.eps <= default_eps * 100:
            flags.append(Flag("info", "unusual_eps", f"eps={bn.eps:g} is unusual for {graph.framework} "
                              f"(default {default_eps:g})", bn.id))
        if calls is not None and bn.id in calls:
            if calls[bn.id] == 0:
                flags.append(Flag("warning", "unreached", "the forward pass never reaches this layer", bn.id))
            elif calls[bn.id] > 1:
                flags.append(Flag("warning", "reused", f"called {calls[bn.id]} times in one forward pass: "
                                  "one set of statistics serves different inputs", bn.id))
    return flags


@dataclass
class LayerEvidence:
    id: str
    channels: int
    frozen: bool
    mean_shift_max: float
    mean_shift_median: float
    log_var_ratio_max: float
    """the largest |ln(stored var / data var)|"""
    log_var_ratio_median: float
    share_off: float
    progress: float | None
    """median over channels of how far stored stats moved from (0, 1) towards the data's"""
    never_updated: bool
    problem: bool


def compare(bn: BNLayer, data_mean: np.ndarray, data_var: np.ndarray, threshold: float) -> LayerEvidence:
    sd2 = np.asarray(data_var, np.float64) + bn.eps
    shift = np.abs(data_mean - bn.mean) / np.sqrt(sd2)
    log_ratio = np.log((np.maximum(bn.var, 0) + bn.eps) / sd2)
    off = (shift > threshold) | (np.abs(log_ratio) > threshold)
    share = float(np.mean(off))
    return LayerEvidence(bn.id, bn.channels, bn.frozen, float(shift.max()), float(np.median(shift)),
                         float(np.abs(log_ratio).max()), float(np.median(log_ratio)), share,
                         _progress(bn, data_mean, sd2), never_updated(bn), share > SHARE_OFF)


def _progress(bn: BNLayer, data_mean: np.ndarray, sd2: np.ndarray) -> float | None:
    """Fraction of the way from the initial (0, 1) to the data's statistics, in standardised units.

    Only channels whose data statistics are far from the initial values say anything; None when
    there are none (then the initial values happened to fit the data).
    """
    sd = np.sqrt(sd2)
    dist_init = np.hypot(data_mean / sd, np.log(sd2 / (1.0 + bn.eps)))
    dist_stored = np.hypot((data_mean - bn.mean) / sd, np.log(sd2 / (np.maximum(bn.var, 0) + bn.eps)))
    informative = dist_init > 0.5
    if not informative.any():
        return None
    return float(np.median(1.0 - dist_stored[informative] / dist_init[informative]))


@dataclass
class Verdict:
    cause: str  # never_updated | stale | domain_shift | healthy
    title: str
    evidence: list[str] = field(default_factory=list)
    fix: str = ""


STALE_PROGRESS = 0.75


def verdicts(graph: ModelGraph, layers: list[LayerEvidence], fix_command: str) -> list[Verdict]:
    """Name the causes the evidence supports, strongest first; ``healthy`` when nothing is off."""
    problems = [e for e in layers if e.problem]
    if not problems:
        return [Verdict("healthy", "healthy: stored statistics match the data",
                        [f"{len(layers)} BN layer(s) checked; largest mean shift "
                         f"{max((e.mean_shift_max for e in layers), default=0):.3g} std"])]
    found = []
    untouched = [e for e in problems if e.never_updated]
    if untouched:
        found.append(Verdict("never_updated", "never updated: the moving averages never left 0 / 1",
                             [f"{len(untouched)} layer(s) hold mean exactly 0 and variance exactly 1: "
                              + ", ".join(e.id for e in untouched[:5])], fix_command))
    rest = [e for e in problems if not e.never_updated]
    stale = [e for e in rest if e.progress is not None and e.progress < STALE_PROGRESS]
    if rest and len(stale) * 2 > len(rest):
        decays = sorted({round(d, 6) for bn in graph.bn_layers if (d := decay(graph, bn)) is not None})
        evidence = [f"{len(stale)} of {len(rest)} off layer(s) moved only "
                    f"{np.median([e.progress for e in stale]):.0%} of the way from the initial 0/1 "
                    "towards the data's statistics"]
        if decays:
            evidence.append(f"moving-average decay {', '.join(f'{d:g}' for d in decays)}")
        found.append(Verdict("stale", "stale moving averages: training ended before the EMA caught up",
                             evidence, fix_command))
    elif rest:
        frozen = [e for e in rest if e.frozen]
        evidence = [f"{len(rest)} layer(s) hold statistics of other data: median mean shift "
                    f"{np.median([e.mean_shift_median for e in rest]):.3g} std, worst "
                    f"{max(e.mean_shift_max for e in rest):.3g} std"]
        if frozen:
            evidence.append(f"{len(frozen)} of them are frozen (trainable=False): their statistics come "
                            "from the data they were pre-trained on")
        found.append(Verdict("domain_shift", "frozen BN statistics from another data set / domain shift",
                             evidence, fix_command + "   (calibrate on data of the domain you deploy to)"))
    return found
