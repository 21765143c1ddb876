"""bnrepair: repair BatchNorm statistics in saved checkpoints (recalibrate, diagnose, fold, export).

Module names never equal a public function's name (``recalibration``, ``diagnosis``, ``folding``,
``deploy``), so importing a submodule cannot shadow ``bnrepair.recalibrate`` or ``bnrepair.fold``.
``docs/architecture.md`` walks through the package.
"""

from .api import diagnose, export, fold, inspect, load, recalibrate
from .options import DataOptions, LoadOptions, RecalibrationOptions, VerifyOptions
from .version import __version__

__all__ = ["DataOptions", "LoadOptions", "RecalibrationOptions", "VerifyOptions", "__version__", "diagnose", "export",
           "fold", "inspect", "load", "recalibrate"]
