"""How a checkpoint is to be loaded: one typed set of options, built once from the flags or the API's keywords.

Each option belongs to the formats that can use it; one given for a file of another format is refused
with a line that names both (``--arch applies to PyTorch state_dicts; model.h5 is a Keras file``)
instead of being silently dropped.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from .errors import InputError


def _option(default, flag: str, applies: str, *, factory=None):
    """A field with the flag that sets it and the formats (registry names, comma-separated) it applies to."""
    meta = {"flag": flag, "applies": tuple(applies.split(","))}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class LoadOptions:
    custom_objects: Path | None = _option(None, "--custom-objects", "keras")
    unsafe: bool = _option(False, "--unsafe", "keras")
    arch: str | None = _option(None, "--arch", "torch")
    arch_kwargs: str | None = _option(None, "--arch-kwargs", "torch")
    key: str | None = _option(None, "--key", "torch")
    trust_pickle: bool = _option(False, "--trust-pickle", "torch")
    trust_code: bool = _option(False, "--trust-code", "torch,savedmodel,tf1")
    safe_globals: tuple[str, ...] = _option(None, "--safe-global", "torch", factory=tuple)
    signature: str = _option("serving_default", "--signature", "savedmodel")
    input_name: str | None = _option(None, "--input", "savedmodel,onnx,tf1")
    feeds: tuple[str, ...] = _option(None, "--feed", "tf1", factory=tuple)
    step: int | None = _option(None, "--step", "tf1")
    amp: str | None = _option(None, "--amp", "torch")

    @classmethod
    def of(cls, options: LoadOptions | None = None, **given) -> LoadOptions:
        """``options`` with the keyword arguments ``given`` on top; an unknown keyword is a TypeError, as for
        any Python call."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; load options are "
                            f"{', '.join(sorted(names))}")
        for name in ("safe_globals", "feeds"):
            if name in given:
                given[name] = tuple(given[name] or ())
        base = options or cls()
        return cls(**{**{f.name: getattr(base, f.name) for f in fields(cls)}, **given})

    def given(self) -> dict[str, object]:
        """The options that differ from their defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != (f.default if f.default_factory is MISSING else f.default_factory())}

    def check_applies(self, framework: str, path: Path, title: str) -> None:
        """Refuse an option that the file's format (registry name ``framework``, shown as ``title``) cannot use."""
        by_name = {f.name: f for f in fields(self)}
        for name in self.given():
            meta = by_name[name].metadata
            if framework not in meta["applies"]:
                raise InputError(f"{meta['flag']} applies to {APPLIES_TO[meta['applies']]}; {path} is "
                                 f"{title}")


AMP = ("bf16", "fp16")
"""--amp: the autocast dtypes a torch forward may run in"""


def check_amp(amp: str | None) -> str | None:
    if amp is not None and amp not in AMP:
        raise InputError(f"--amp must be one of {', '.join(AMP)}, got {amp!r}")
    return amp


DEVICES = ("auto", "cpu", "gpu", "cuda")
"""--device names; gpu and cuda are the same (TensorFlow says GPU, torch CUDA)"""


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise InputError(f"--device must be one of {', '.join(DEVICES)} (gpu and cuda are the same), got {device!r}")
    return device


APPLIES_TO = {("keras",): "Keras .h5/.keras files", ("torch",): "PyTorch checkpoints",
              ("savedmodel",): "TensorFlow SavedModels", ("torch", "savedmodel"): "PyTorch and SavedModel files",
              ("torch", "savedmodel", "tf1"): "PyTorch, SavedModel and TF1 checkpoint files",
              ("savedmodel", "onnx", "tf1"): "SavedModels, ONNX models and TF1 checkpoints",
              ("tf1",): "TF1 training checkpoints (.meta + .index/.data)"}
