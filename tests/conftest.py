"""Shared test set-up: the fixture scripts' helpers (``synthetic``, ``make_keras``, ...) import as modules,
so tests read the shipped data and judge the models exactly the way the scripts that built them did; the
repository root is importable too, as the pickled torch fixture's classes (``fixtures.torch.arch``) need."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT / "fixtures", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
