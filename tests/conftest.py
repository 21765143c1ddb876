"""Shared test set-up: the repository root is importable, so tests use the fixture scripts' own helpers
(``from fixtures import synthetic, make_keras``) and judge the models exactly the way the scripts that built
them did; the pickled torch fixture's classes (``fixtures.torch.arch``) import from there too. Only the root
goes on the path: ``fixtures/keras`` and ``fixtures/torch`` must never shadow the real packages."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
