"""What a recalibration changed, per BN layer, as a table for people and JSON for pipelines."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .recalibrate import Outcome


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


@dataclass
class Report:
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
    version: str = __version__
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, outcome: Outcome, framework: str, mode: str, device: str, seed: int | None, **kw) -> "Report":
        return cls(framework=framework, mode=mode, device=device, samples=outcome.samples, seed=seed,
                   passes=outcome.passes, converged=outcome.converged, seconds=outcome.seconds,
                   layers=[layer_change(bn.id, bn.channels, bn.frozen, outcome.before[bn.id], outcome.after[bn.id])
                           for bn in outcome.layers], **kw)

    @property
    def worst_shift(self) -> float:
        return max((layer.max_mean_shift for layer in self.layers), default=0.0)

    def summary(self) -> str:
        frozen = sum(layer.frozen for layer in self.layers)
        moved = sum(layer.max_mean_shift > 0.1 or not (0.8 <= layer.var_ratio_min <= layer.var_ratio_max <= 1.25)
                    for layer in self.layers)
        text = (f"Recalibrated {len(self.layers)} BN layer(s) ({frozen} frozen) from {self.samples} samples "
                f"in {self.seconds:.1f}s, mode {self.mode}, {self.passes} pass(es) on {self.device}; "
                f"{moved} layer(s) changed materially, largest mean shift {self.worst_shift:.3g} std")
        if self.mode == "eval" and not self.converged:
            text += " (did not converge: raise the pass limit or check the model)"
        if self.skipped_bad:
            text += f"; skipped {self.skipped_bad} undecodable image(s)"
        if self.output:
            text += f"; wrote {self.output}"
        return text

    def to_dict(self) -> dict:
        return _finite(asdict(self))

    def write_json(self, path: Path) -> None:
        from .writers import atomic_path

        with atomic_path(Path(path)) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def render(self, console) -> None:
        from rich.table import Table

        table = Table(title="BatchNorm statistics", title_justify="left")
        for name, justify in (("layer", "left"), ("channels", "right"), ("frozen", "center"),
                              ("max |Δmean|/std", "right"), ("var new/old", "right")):
            table.add_column(name, justify=justify)
        for layer in self.layers:
            table.add_row(layer.id, str(layer.channels), "yes" if layer.frozen else "",
                          f"{layer.max_mean_shift:.3g}", f"{layer.var_ratio_min:.3g} – {layer.var_ratio_max:.3g}")
        console.print(table)
        console.print(self.summary())


def layer_change(layer_id: str, channels: int, frozen: bool, old, new) -> LayerChange:
    old_mean, old_var = (np.asarray(a, np.float64) for a in old)
    new_mean, new_var = (np.asarray(a, np.float64) for a in new)
    std = np.sqrt(np.maximum(new_var, np.finfo(np.float64).tiny))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = new_var / old_var
    return LayerChange(layer_id, channels, frozen, float(np.max(np.abs(new_mean - old_mean) / std)),
                       float(np.min(ratio)), float(np.max(ratio)))


def _finite(value):
    """JSON has no inf/NaN: write them as strings so any parser reads the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
