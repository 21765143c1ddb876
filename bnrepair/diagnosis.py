"""Checks and verdicts on BN statistics: pure numpy over the internal graph and collected moments.

``inspect_layers`` needs no data: it reads the stored statistics and settings. ``compare`` sets
the stored statistics against what the calibration data produces, ``verdicts`` names the cause
(never updated, stale moving averages, statistics of other data; ``docs/architecture.md`` lists
them) with the evidence that supports each, and ``output_evidence`` compares predictions.

Definitions (per channel; σ²_data is the data's variance, ε the layer's eps):
  mean shift       |μ_data − μ_stored| / sqrt(σ²_data + ε)
  log var ratio    ln((σ²_stored + ε) / (σ²_data + ε))
  EMA fraction α   the stored statistics fitted as α·data + (1 − α)·initial (mean 0, variance 1),
                   which is exactly what an exponential moving average that started at its
                   initial values and ran too few steps holds; α ≈ 1 − decay^steps is small and
                   the fit is close for a stale EMA, while statistics of other data fit it poorly
                   or with α near 1.
A channel is off when its mean shift or |log var ratio| exceeds the threshold; a layer has a
problem when more than ``SHARE_OFF`` of its channels are off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import metrics
from .graph import BNLayer, ModelGraph

THRESHOLD = 0.5
"""a channel is off when its mean shift (in data std) or |ln variance ratio| exceeds this (diagnose --threshold)"""
SHARE_OFF = 0.1
"""a layer is off when more than this share of its channels are"""


@dataclass
class Flag:
    level: str  # "error" | "warning" | "info"
    code: str
    message: str
    layer: str | None = None


def never_updated(bn: BNLayer) -> bool:
    return bool(np.all(bn.mean == 0.0) and np.all(bn.var == 1.0))


def inspect_layers(graph: ModelGraph, calls: dict[str, int] | None = None) -> list[Flag]:
    """What the stored statistics and settings alone say; ``calls``: forward calls per layer when known."""
    flags = [Flag("info", "left_alone", f"not recalibrated: {why}", layer) for layer, why in graph.left_alone]
    default_eps = graph.default_eps
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
        if bn.separate_from:
            flags.append(Flag("error", "separate_inference_variables", "inference reads its own moving averages, "
                              f"which no op updates; training updates {bn.separate_from} (a graph built twice "
                              "without reuse)", bn.id))
        elif never_updated(bn):
            flags.append(Flag("error", "never_updated", "statistics still at their initial values "
                              "(mean exactly 0, variance exactly 1): updates never ran", bn.id))
        d = graph.decay(bn)
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
    ema_fraction: float | None
    ema_misfit: float | None
    """relative residual of the EMA fit (and disagreement of its mean and variance parts)"""
    never_updated: bool
    problem: bool


def deviation(mean, var, eps: float, data_mean, data_var) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: how far stored statistics sit from the data's, as mean shift in data std and ln variance
    ratio (eps included). Diagnose judges stored against measured with it, recalibrate old against new."""
    sd2 = np.asarray(data_var, np.float64) + eps
    shift = np.abs(np.asarray(data_mean, np.float64) - mean) / np.sqrt(sd2)
    return shift, np.log((np.maximum(var, 0) + eps) / sd2)


def share_off(shift: np.ndarray, log_ratio: np.ndarray, threshold: float = THRESHOLD) -> float:
    return float(np.mean((shift > threshold) | (np.abs(log_ratio) > threshold)))


def compare(bn: BNLayer, data_mean: np.ndarray, data_var: np.ndarray, threshold: float) -> LayerEvidence:
    shift, log_ratio = deviation(bn.mean, bn.var, bn.eps, data_mean, data_var)
    sd2 = np.asarray(data_var, np.float64) + bn.eps
    share = share_off(shift, log_ratio, threshold)
    fraction, misfit = _ema_fit(bn, np.asarray(data_mean, np.float64), sd2 - bn.eps)
    return LayerEvidence(id=bn.id, channels=bn.channels, frozen=bn.frozen, mean_shift_max=float(shift.max()),
                         mean_shift_median=float(np.median(shift)), log_var_ratio_max=float(np.abs(log_ratio).max()),
                         log_var_ratio_median=float(np.median(log_ratio)), share_off=share, ema_fraction=fraction,
                         ema_misfit=misfit, never_updated=never_updated(bn), problem=share > SHARE_OFF)


def _ema_fit(bn: BNLayer, data_mean: np.ndarray, data_var: np.ndarray) -> tuple[float | None, float | None]:
    """Least-squares α in ``stored − initial = α (data − initial)``, for the mean and the variance.

    A part whose data values sit at the initial ones (no signal) is left out; None when both are.
    """
    sd = np.sqrt(data_var + bn.eps)
    parts = []
    for stored, data in ((bn.mean / sd, data_mean / sd), ((bn.var - 1.0) / (data_var + bn.eps),
                                                           (data_var - 1.0) / (data_var + bn.eps))):
        norm = np.linalg.norm(data)
        if norm < 0.1 * np.sqrt(len(data)):
            continue
        alpha = float(stored @ data / norm**2)
        parts.append((alpha, float(np.linalg.norm(stored - alpha * data) / norm)))
    if not parts:
        return None, None
    alphas = [a for a, _ in parts]
    return float(np.mean(alphas)), max(max(r for _, r in parts), max(alphas) - min(alphas))


@dataclass
class Verdict:
    cause: str  # unrepresentative_data | separate_variables | never_updated | stale | domain_shift | healthy
    title: str
    evidence: list[str] = field(default_factory=list)
    fix: str = ""


STALE_FRACTION = 0.6
STALE_MISFIT = 0.2


LOSS = 0.01
"""labelled accuracy lost by recalibrating (1 point or more) that withdraws the fix"""


def verdicts(graph: ModelGraph, layers: list[LayerEvidence], fix_command: str,
             outputs: dict | None = None) -> list[Verdict]:
    """Name the causes the evidence supports, strongest first; ``healthy`` when nothing is off. Where labels show
    that recalibrating on this data loses accuracy, that comes first and no fix is recommended."""
    found = _causes(graph, layers, fix_command)
    gain = (outputs or {}).get("expected_gain")
    if found[0].cause == "healthy" or gain is None or gain > -LOSS:
        return found
    accuracy = outputs["accuracy"]
    for verdict in found:
        verdict.fix = ""
    return [Verdict("unrepresentative_data", "do not recalibrate on this data: it loses accuracy",
                    [f"on these labelled samples accuracy falls from {accuracy['inference']:.1%} with the stored "
                     f"statistics to {accuracy['recalibrated']:.1%} after recalibration ({gain * 100:+.1f} points)",
                     "the calibration data does not represent what the model sees (another class mix, another "
                     "domain, other preprocessing): the stored statistics fit the model's inputs better than this "
                     "data's do; recalibrate only on data drawn as the deployed model's inputs are"])] + found


def _causes(graph: ModelGraph, layers: list[LayerEvidence], fix_command: str) -> list[Verdict]:
    problems = [e for e in layers if e.problem]
    if not problems:
        return [Verdict("healthy", "healthy: stored statistics match the data",
                        [f"{len(layers)} BN layer(s) checked; largest mean shift "
                         f"{max((e.mean_shift_max for e in layers), default=0):.3g} std"])]
    found = []
    separate = [e for e in problems if graph.layer(e.id).separate_from]
    if separate:
        found.append(Verdict("separate_variables", "separate inference variables: inference reads moving averages "
                             "that training never updates (the graph was built twice without reuse)",
                             [f"{len(separate)} layer(s) read statistics no op of the graph updates, while training "
                              "updates another set: " + some_of([f"{e.id} (training updates "
                                                                f"{graph.layer(e.id).separate_from})"
                                                                for e in separate], 3),
                              "recalibrating writes measured statistics into the variables inference reads; "
                              "in the training script, share them (variable_scope reuse, tf.get_variable)"],
                             fix_command))
    problems = [e for e in problems if not graph.layer(e.id).separate_from]
    untouched = [e for e in problems if e.never_updated]
    if untouched:
        found.append(Verdict("never_updated", "never updated: the moving averages never left 0 / 1",
                             [f"{len(untouched)} layer(s) hold mean exactly 0 and variance exactly 1: "
                              + some_of([e.id for e in untouched], 5)], fix_command))
    rest = [e for e in problems if not e.never_updated]
    stale = [e for e in rest if e.ema_fraction is not None and e.ema_fraction < STALE_FRACTION
             and e.ema_misfit < STALE_MISFIT]
    if rest and len(stale) * 2 > len(rest):
        decays = sorted({round(d, 6) for bn in graph.bn_layers if (d := graph.decay(bn)) is not None})
        evidence = [f"{len(stale)} of {len(rest)} off layer(s) hold {np.median([e.ema_fraction for e in stale]):.0%} "
                    "of the data's statistics and the rest of the initial 0/1 (a moving average that "
                    f"stopped early; fit residual at most {max(e.ema_misfit for e in stale):.2f})"]
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
            evidence.append(f"{len(frozen)} of them are frozen ({graph.frozen_means}): their statistics come "
                            "from the data they were pre-trained on")
        evidence.append("calibrate on data of the domain you deploy to")
        title = "BN statistics from other data (domain shift)"
        found.append(Verdict("domain_shift", f"frozen {title}" if frozen else title, evidence, fix_command))
    return found


def some_of(names: list[str], shown: int) -> str:
    """The first ``shown`` names, and an ellipsis where there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def output_evidence(inference: np.ndarray, training: np.ndarray, after: np.ndarray,
                    labels: np.ndarray | None) -> dict:
    """Output-level evidence: inference vs training-mode predictions and, with labels, the accuracy of each
    and after a recalibration (the expected gain), plus a note when ranking survives a broken scale."""
    outputs = {"agreement_inference_vs_training": metrics.agreement(inference, training),
               "output_change_inference_vs_training": metrics.relative_change(training, inference)}
    if labels is None:
        return outputs
    accuracy = {name: metrics.accuracy(scores, labels)
                for name, scores in (("inference", inference), ("training", training), ("recalibrated", after))}
    outputs["accuracy"] = accuracy
    outputs["expected_gain"] = accuracy["recalibrated"] - accuracy["inference"]
    ranking = metrics.ranking_quality(inference, labels)
    classes = max(inference.shape[1], 2)
    if ranking is not None:
        outputs["ranking"] = {"metric": ranking[0], "value": ranking[1]}
        if accuracy["inference"] < 1.5 / classes and ranking[1] > 0.8:
            outputs["scale_note"] = (f"accuracy is near chance while {ranking[0]} is {ranking[1]:.2f}: "
                                     "the model still ranks well, its output scale is off")
    return outputs
