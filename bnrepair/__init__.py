"""bnrepair: repair BatchNorm statistics in saved checkpoints (recalibrate, diagnose, fold, export)."""

__version__ = "0.1.0"

from .api import load, recalibrate  # noqa: E402

__all__ = ["__version__", "load", "recalibrate"]
