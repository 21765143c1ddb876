"""User code named on the command line (``--arch``, ``--data-fn``): ``MODULE:CALLABLE`` or ``FILE.py:CALLABLE``.

Naming it is the user's explicit choice to run it; nothing from a checkpoint is executed this way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import InputError


def call_spec(spec: str, option: str):
    """The callable that ``spec`` names; a clear error when the module or attribute is missing."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise InputError(f"{option} {spec!r}: expected MODULE:CALLABLE or FILE.py:CALLABLE")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InputError(f"{option}: {path}: no such file")
        name = f"bnrepair_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise InputError(f"{option}: {path}: importing failed: {type(exc).__name__}: {exc}") from None
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:  # as `python -m` does: modules beside you import
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise InputError(f"{option}: cannot import {target!r} ({exc}; the current folder is on the import "
                             "path, or give FILE.py:CALLABLE)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"{option}: {target} has no callable {attr!r}")
    return fn


class DataFunction:
    """``--data-fn MODULE:CALLABLE``: calibration data that a named callable returns. Its module is imported
    when named (a missing one is refused before any work); it is called when the batches are needed. The same
    callable runs on every rank, so under torchrun the ranks share its batches out as they do a path's."""

    def __init__(self, spec: str):
        self.spec = spec
        self.make = call_spec(spec, "--data-fn")

    def batches(self):
        """What the callable returns; its failure is the user's, reported in one line."""
        try:
            return self.make()
        except Exception as exc:
            raise InputError(f"--data-fn {self.spec}: calling it failed: {type(exc).__name__}: {exc}") from None
