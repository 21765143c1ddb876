"""bnrepair: repair BatchNorm statistics in saved checkpoints (recalibrate, diagnose, fold, export)."""

__version__ = "0.1.0"

from .api import export, fold, load, recalibrate  # noqa: E402

__all__ = ["__version__", "export", "fold", "load", "recalibrate"]
