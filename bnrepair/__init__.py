"""bnrepair: repair BatchNorm statistics in saved checkpoints (recalibrate, diagnose, fold, export).

Module names never equal a public function's name (``diagnosis``, ``folding``, ``deploy``), so
importing a submodule cannot shadow ``bnrepair.diagnose`` or ``bnrepair.fold``.
"""

__version__ = "0.1.0"

from .api import diagnose, export, fold, inspect, load, recalibrate  # noqa: E402

__all__ = ["__version__", "diagnose", "export", "fold", "inspect", "load", "recalibrate"]
