"""Shared test set-up: the repository root is importable, so tests use the fixture scripts' own helpers
(``from fixtures import synthetic, make_keras``) and judge the models exactly the way the scripts that built
them did; the pickled torch fixture's classes (``fixtures.torch.arch``) import from there too. Only the root
goes on the path: ``fixtures/keras`` and ``fixtures/torch`` must never shadow the real packages.

Tests that build Keras models import TensorFlow before bnrepair does, so oneDNN is asked for here too, as
``tf_runtime.import_tensorflow`` asks for it (channels_first convolutions run on every CPU), and torch's triton
is imported before TensorFlow, as there too."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bnrepair.frameworks.tf_runtime import triton_first  # noqa: E402  (the path above first)

triton_first()  # tests import TensorFlow directly, and torch's triton must come first (see triton_first)
