"""Every report bnrepair gives: recalibrate, inspect, diagnose, fold / export; a table for people, JSON for
pipelines. Reports hold results; the computations that produce them live in the core modules."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .diagnosis import SHARE_OFF, THRESHOLD, deviation, share_off, some_of
from .moments import moved
from .recalibration import Outcome
from .terminal import shown
from .version import __version__


class Written:
    """A report that ``--json`` writes: ``to_dict`` as JSON, atomically, or to standard output for ``-``."""

    def to_dict(self) -> dict:
        raise NotImplementedError

    def write_json(self, path: Path) -> None:
        from .writers import atomic_path

        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if str(path) == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        with atomic_path(Path(path)) as tmp:
            Path(tmp).write_text(text)


@dataclass
class LayerChange:
    id: str
    channels: int
    frozen: bool
    max_mean_shift: float
    """largest |new mean - old mean| / new std over channels"""
    var_ratio_min: float
    var_ratio_max: float
    """range of new variance / old variance over channels"""
    share_moved: float = 0.0
    """share of channels whose statistics moved beyond ``diagnosis.THRESHOLD`` (the line diagnose draws)"""

    @property
    def moved(self) -> bool:
        return self.share_moved > SHARE_OFF


@dataclass
class Report(Written):
    framework: str
    mode: str
    device: str
    samples: int
    seed: int | None
    passes: int
    converged: bool
    seconds: float
    layers: list[LayerChange]
    input: str | None = None
    output: str | None = None
    input_sha256: str | None = None
    output_sha256: str | None = None
    skipped_bad: int = 0
    classes_lost: list[str] = field(default_factory=list)
    """image-folder classes --skip-bad left without any image: the statistics describe the others only"""
    change_per_pass: list[float] = field(default_factory=list)
    """largest change of any statistic in each pass, in std units (eval mode converges on it)"""
    unreached: list[str] = field(default_factory=list)
    """BN layers the forward pass never reaches in inference mode, left unchanged"""
    noise_floor: float | None = None
    """eval mode: how far float32 arithmetic alone moves this model's statistics, where passes stopped shrinking
    the change (a change within twice it counts as converged)"""
    estimated_error: float | None = None
    """eval mode, stopped after a drift-corrected pass: its distance from the fixed point, in std, as the last
    round's contraction predicts it"""
    eval_batch: int | None = None
    """eval mode: the most samples one forward may take in the passes after the start (``--eval-batch-size``)"""
    world_size: int = 1
    """processes that shared the data (torch.distributed); the statistics are those of all their samples"""
    version: str = __version__
    export: object | None = None
    """the ``DeployReport`` of the ONNX file written with ``--export``"""
    run: dict = field(default_factory=dict)
    """what repeats the run: the data, the device and every option group (``api.recorded``)"""

    @classmethod
    def nothing_to_do(cls, framework: str, mode: str, device: str) -> "Report":
        """A model in memory without BN layers: nothing changes (``torch.optim.swa_utils.update_bn`` returns too)."""
        return cls(framework, mode, device, samples=0, seed=None, passes=0, converged=True, seconds=0.0, layers=[])

    @classmethod
    def of(cls, outcome: Outcome, framework: str, mode: str, device: str, seed: int | None, **kw) -> "Report":
        return cls(framework=framework, mode=mode, device=device, samples=outcome.samples, seed=seed,
                   passes=outcome.passes, converged=outcome.converged, seconds=outcome.seconds,
                   layers=[layer_change(bn.id, bn.channels, bn.frozen, bn.eps, outcome.before[bn.id],
                                        outcome.after[bn.id])
                           for bn in outcome.layers], change_per_pass=outcome.change_per_pass,
                   unreached=outcome.unreached, noise_floor=outcome.noise_floor,
                   estimated_error=outcome.estimated_error, eval_batch=outcome.eval_batch, **kw)

    def convergence_note(self) -> str:
        last = self.change_per_pass[-1] if self.change_per_pass else float("nan")
        return (f"eval mode did not converge in {self.passes} passes: the last moved statistics by {last:.3g} std, "
                "more than --tol; raise --max-passes, or use --mode train")

    def classes_note(self) -> str:
        lost = self.classes_lost
        return (f"no image of class(es) {', '.join(lost[:5])}{', ...' if len(lost) > 5 else ''} was left: "
                "the new statistics describe the other classes only")

    @property
    def worst_shift(self) -> float:
        return max((layer.max_mean_shift for layer in self.layers), default=0.0)

    def summary(self) -> str:
        if not self.layers:
            return "the model has no BatchNorm layers: nothing to recalibrate"
        frozen = sum(layer.frozen for layer in self.layers)
        moved = sum(layer.moved for layer in self.layers)
        text = (f"Recalibrated {len(self.layers)} BN layer(s) ({frozen} frozen) from {self.samples} samples "
                f"in {self.seconds:.1f}s, mode {self.mode}, {self.passes} pass(es)"
                f"{f' (forwards of up to {self.eval_batch} samples after the start)' if self.eval_batch else ''} "
                f"on {self.device}; ")
        text += (f"{moved} layer(s) changed materially (over {SHARE_OFF:.0%} of channels beyond {THRESHOLD} std, "
                 f"as diagnose counts), largest mean shift {self.worst_shift:.3g} std" if moved else
                 f"nothing to repair: no layer moved beyond {THRESHOLD} std, the line diagnose draws (largest mean "
                 f"shift {self.worst_shift:.3g} std)")
        if not self.converged:
            text += f" ({self.convergence_note()})"
        elif self.noise_floor is not None:
            text += (f"; converged to this model's float32 noise floor: a pass moves statistics perturbed by two "
                     f"float32 ulps by {self.noise_floor:.2g} std")
        elif self.estimated_error is not None:
            text += (f"; converged: the last pass lies an estimated {self.estimated_error:.2g} std from the fixed "
                     "point (the contraction of the pass before)")
        if self.unreached:
            text += (f"; left {len(self.unreached)} BN layer(s) that inference never reaches unchanged "
                     f"({', '.join(self.unreached[:3])}{', ...' if len(self.unreached) > 3 else ''})")
        if self.skipped_bad:
            text += f"; skipped {self.skipped_bad} undecodable image(s)"
        if self.classes_lost:
            text += f" ({self.classes_note()})"
        if self.output:
            text += f"; wrote {self.output}"
        return text

    def to_dict(self) -> dict:
        return _finite(asdict(self))

    def render(self, console) -> None:
        from rich.table import Table

        shown_rows = sorted(self.layers, key=lambda layer: (layer.share_moved, layer.max_mean_shift),
                            reverse=True)[:ROWS]
        table = Table(title="BatchNorm statistics, largest change first", title_justify="left")
        id_column(table, "layer", [layer.id for layer in shown_rows])
        for name, justify in (("channels", "right"), ("frozen", "center"), ("max |Δmean|/std", "right"),
                              ("var new/old", "right")):
            table.add_column(name, justify=justify)
        for layer in shown_rows:
            table.add_row(shown(layer.id), str(layer.channels), "yes" if layer.frozen else "",
                          f"{layer.max_mean_shift:.3g}", f"{layer.var_ratio_min:.3g} – {layer.var_ratio_max:.3g}",
                          style="red" if layer.moved else None)
        console.print(table)
        more_rows(console, len(self.layers))
        said_preprocessing(console, self.run)
        console.print(shown(self.summary()))


def layer_change(layer_id: str, channels: int, frozen: bool, eps: float, old, new) -> LayerChange:
    old, new = (tuple(np.asarray(a, np.float64) for a in pair) for pair in (old, new))
    shift, ratio_min, ratio_max = moved(old, new)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        share = share_off(*deviation(*old, eps, *new))
    return LayerChange(id=layer_id, channels=channels, frozen=frozen, max_mean_shift=shift,
                       var_ratio_min=ratio_min, var_ratio_max=ratio_max, share_moved=share)


ROWS = 20
"""table rows a terminal report shows; --json holds every layer"""


def more_rows(console, count: int) -> None:
    if count > ROWS:
        console.print(f"... and {count - ROWS} more layer(s) (see --json)")


def said_preprocessing(console, run: dict) -> None:
    """The preprocessing images got and where it came from, so a default is never unseen."""
    used = run.get("preprocessing")
    if used and used["name"] != "none":
        console.print(f"preprocessing: {shown(used['name'])} ({used['source']})", highlight=False)


def id_column(table, name: str, ids) -> None:
    """A column of layer ids, never cut or wrapped: ids are what --layers / --skip take, so they must read
    whole; the other columns wrap instead."""
    table.add_column(name, no_wrap=True, min_width=max((len(shown(i)) for i in ids), default=len(name)))


def _finite(value):
    """JSON has no inf/NaN: write them as strings so any parser reads the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _stats_summary(values: np.ndarray) -> str:
    return f"{np.min(values):.3g} / {np.median(values):.3g} / {np.max(values):.3g}"


LEVEL_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


@dataclass
class InspectReport(Written):
    """``bnrepair inspect``: settings and stored statistics per BN layer, and what looks wrong."""

    framework: str
    source: str
    layers: list
    flags: list
    decays: list = field(default_factory=list)
    version: str = __version__

    @property
    def problems(self) -> bool:
        return any(flag.level in ("error", "warning") for flag in self.flags)

    def to_dict(self) -> dict:
        return _finite({
            "framework": self.framework, "source": self.source, "version": self.version,
            "problems": self.problems,
            "layers": [{"id": bn.id, "kind": bn.kind, "channels": bn.channels, "eps": bn.eps,
                        "momentum": bn.momentum, "decay": d, "frozen": bn.frozen, "tracks_stats": bn.tracks_stats,
                        "mean": {"min": float(np.min(bn.mean)), "median": float(np.median(bn.mean)),
                                 "max": float(np.max(bn.mean))},
                        "var": {"min": float(np.min(bn.var)), "median": float(np.median(bn.var)),
                                "max": float(np.max(bn.var))},
                        "producer": bn.producer}
                       for bn, d in zip(self.layers, self.decays)],
            "flags": [asdict(flag) for flag in self.flags]})

    def render(self, console) -> None:
        from rich.table import Table

        table = Table(title=f"BatchNorm layers of {shown(self.source)} ({self.framework})", title_justify="left")
        id_column(table, "layer", [bn.id for bn in self.layers])
        for name in ("channels", "eps", "decay", "frozen", "mean min/med/max", "var min/med/max"):
            table.add_column(name)
        for bn, d in zip(self.layers, self.decays):
            cells = [shown(bn.id), str(bn.channels), f"{bn.eps:g}", "–" if d is None else f"{d:g}",
                     "yes" if bn.frozen else "", _stats_summary(bn.mean), _stats_summary(bn.var)]
            table.add_row(*cells)
        console.print(table)
        alike: dict[tuple[str, str], list[str]] = {}  # one line for a message many layers share
        for flag in self.flags:
            alike.setdefault((flag.level, flag.message), []).append(flag.layer or "")
        for (level, message), layers in alike.items():
            named = layers[0] if len(layers) == 1 else f"{len(layers)} layers ({some_of(layers, 3)})"
            console.print(f"[{LEVEL_STYLE[level]}]{level}[/] {shown(named)}: {shown(message)}", highlight=False)
        console.print("problems found" if self.problems else "no problems found in the stored statistics")


@dataclass
class DiagnoseReport(Written):
    """``bnrepair diagnose``: per-layer evidence ranked worst first, output-level evidence, verdicts."""

    framework: str
    source: str
    samples: int
    threshold: float
    mode: str
    passes: int
    seconds: float
    layers: list
    """LayerEvidence in forward order (``ranked`` gives worst first)"""
    verdicts: list
    flags: list
    outputs: dict
    version: str = __version__
    run: dict = field(default_factory=dict)
    """what repeats the run: the data, the device and every option group (``api.recorded``)"""

    @property
    def healthy(self) -> bool:
        return all(v.cause == "healthy" for v in self.verdicts)

    @property
    def ranked(self) -> list:
        return sorted(self.layers, key=lambda e: (e.share_off, e.mean_shift_max), reverse=True)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = [asdict(e) for e in self.ranked]
        data["healthy"] = self.healthy
        return _finite(data)

    def render(self, console) -> None:
        from rich.table import Table

        table = Table(title="BN layers, worst first", title_justify="left")
        id_column(table, "layer", [e.id for e in self.ranked[:ROWS]])
        for name in ("channels", "frozen", "mean shift max/med", "|log var ratio| max", "channels off",
                     "EMA α (misfit)"):
            table.add_column(name)
        for e in self.ranked[:ROWS]:
            style = "red" if e.problem else None
            cells = [shown(e.id), str(e.channels), "yes" if e.frozen else "",
                     f"{e.mean_shift_max:.3g} / {e.mean_shift_median:.3g}", f"{e.log_var_ratio_max:.3g}",
                     f"{e.share_off:.0%}",
                     "–" if e.ema_fraction is None else f"{e.ema_fraction:.2f} ({e.ema_misfit:.2f})"]
            table.add_row(*cells, style=style)
        console.print(table)
        more_rows(console, len(self.layers))
        said_preprocessing(console, self.run)
        out = self.outputs
        console.print(f"inference vs training-mode predictions agree on {out['agreement_inference_vs_training']:.1%}"
                      f" of {self.samples} samples; outputs differ by "
                      f"{out['output_change_inference_vs_training']:.1%}")
        if "accuracy" in out:
            acc = out["accuracy"]
            console.print(f"accuracy: inference {acc['inference']:.1%}, training mode {acc['training']:.1%}, "
                          f"after recalibration {acc['recalibrated']:.1%} (expected gain "
                          f"{out['expected_gain'] * 100:+.1f} points)")
        if "scale_note" in out:
            console.print(f"[yellow]{out['scale_note']}[/]")
        for verdict in self.verdicts:
            style = "green" if verdict.cause == "healthy" else "bold red"
            console.print(f"[{style}]{verdict.title}[/]", highlight=False)
            for line in verdict.evidence:
                console.print(f"  - {shown(line)}", highlight=False)
            if verdict.fix:
                console.print(f"  fix: {shown(verdict.fix)}", highlight=False, soft_wrap=True)


@dataclass
class FoldRow:
    bn: str
    how: str
    into: list[str]
    """the weights the BN went into"""
    max_abs: float = 0.0
    max_rel: float = 0.0
    float32_noise: float = 0.0
    """float32's own error at that layer: how far the source's output moves when its input moves by two ulps"""


@dataclass
class Refusal:
    bn: str
    reason: str


@dataclass
class Check:
    output: str
    stage: str
    """``fold`` (folded model in its framework) or ``onnx`` (onnxruntime), both against the source"""
    max_abs: float
    max_rel: float
    """largest |difference| over the largest |source value| of that output"""
    float32_noise: float = 0.0
    """float32's own error on that output: how far the source's moves when its input moves by two ulps"""


@dataclass
class DeployReport(Written):
    """What ``fold`` / ``export`` did and how closely the result matches the source."""

    framework: str
    source: str
    output: str | None
    folded: list[FoldRow]
    refused: list[Refusal]
    checks: list[Check]
    samples: int
    inputs: str
    atol: float
    rtol: float
    opset: int | None = None
    provider: str | None = None
    input_sha256: str | None = None
    output_sha256: str | None = None
    seconds: float = 0.0
    version: str = __version__
    run: dict = field(default_factory=dict)
    """what repeats the run: the data, the device and every option group (``api.recorded``)"""
    model = None
    """the folded model in memory (a class attribute, not a field: kept out of JSON)"""

    def to_dict(self) -> dict:
        return _finite(asdict(self))

    def summary(self) -> str:
        worst = {stage: max((c.max_abs for c in self.checks if c.stage == stage), default=None)
                 for stage in ("fold", "onnx")}
        parts = [f"{stage} {value:.2g}" for stage, value in worst.items() if value is not None]
        text = (f"Folded {len(self.folded)} of {len(self.folded) + len(self.refused)} BN layer(s); "
                if self.folded or self.refused else "")
        text += f"verified on {self.samples} samples ({self.inputs}): largest |Δ| {', '.join(parts)}"
        if self.provider:
            text += f" (onnxruntime {self.provider})"
        return text + (f"; wrote {self.output}" if self.output else "")

    def render(self, console) -> None:
        from rich.table import Table

        if self.folded:
            table = Table(title="Folded BN layers", title_justify="left")
            id_column(table, "BN", [row.bn for row in self.folded])
            for name in ("how", "into", "max |Δ|", "rel", "float32 noise"):
                table.add_column(name)
            for row in self.folded:
                table.add_row(shown(row.bn), row.how, shown(", ".join(row.into)), f"{row.max_abs:.2g}",
                              f"{row.max_rel:.2g}", f"{row.float32_noise:.2g}")
            console.print(table)
        if self.refused:
            table = Table(title="Left in place", title_justify="left")
            id_column(table, "BN", [refusal.bn for refusal in self.refused])
            table.add_column("reason")
            for refusal in self.refused:
                table.add_row(shown(refusal.bn), shown(refusal.reason))
            console.print(table)
        said_preprocessing(console, self.run)
        table = Table(title="Outputs against the source", title_justify="left")
        for name in ("output", "stage", "max |Δ|", "rel", "float32 noise"):
            table.add_column(name)
        for check in self.checks:
            table.add_row(shown(check.output), check.stage, f"{check.max_abs:.2g}", f"{check.max_rel:.2g}",
                          f"{check.float32_noise:.2g}")
        console.print(table)
        console.print(shown(self.summary()), highlight=False)
