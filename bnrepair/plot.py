"""``diagnose --plot``: per-layer mean shift and variance ratio against depth, one bar per BN layer."""

from __future__ import annotations

from pathlib import Path

from .errors import require
from .writers import atomic_path


def plot_evidence(report, path: Path) -> int:
    """Draw the figure to ``path``; returns the number of bars per panel (one per BN layer)."""
    require(("matplotlib",), "--plot", "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = report.layers
    depth = range(len(layers))
    colours = ["tab:red" if e.problem else "tab:blue" for e in layers]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 0.35 * len(layers) + 2), 6))
    bars = top.bar(depth, [e.mean_shift_max for e in layers], color=colours)
    top.axhline(report.threshold, color="grey", linestyle="--", linewidth=1)
    top.set_ylabel("max |Δmean| / σ_data")
    bottom.bar(depth, [e.log_var_ratio_median for e in layers], color=colours)
    bottom.axhline(0, color="black", linewidth=0.8)
    for sign in (1, -1):
        bottom.axhline(sign * report.threshold, color="grey", linestyle="--", linewidth=1)
    bottom.set_ylabel("median ln(var stored / var data)")
    bottom.set_xlabel("BN layer (forward order)")
    bottom.set_xticks(list(depth), [e.id for e in layers], rotation=90, fontsize=7)
    top.set_title(f"{Path(report.source).name}: stored BN statistics vs calibration data (red: off)")
    fig.tight_layout()
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return len(bars)
