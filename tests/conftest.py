"""Shared test set-up: the fixture scripts' helpers (``synthetic``, ``make_keras``, ...) import as modules,
so tests read the shipped data and judge the models exactly the way the scripts that built them did."""

import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))
