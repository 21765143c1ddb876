"""Options by name, in typed groups: built once from the flags or the API's keywords, passed whole.

Each group is a frozen dataclass whose fields carry the flag that sets them and their help text, so the
CLI's options, the API's keywords and a repeated command line (``as_argv``, diagnose's ``fix:`` line) all
come from one place. A load option also names the formats (registry names) that can use it; one given for a
file of another format is refused (``frameworks.load``) instead of being silently dropped. A new option is
one field here, one alias in ``cli.py`` and one parameter per command that takes it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import InputError


def option(default, flag: str, help: str, *, applies: str | None = None, panel: str | None = None, factory=None):
    """A field with the flag that sets it, its help, and (load options) the formats it applies to."""
    meta = {"flag": flag, "help": help, "panel": panel,
            "applies": tuple(applies.split(",")) if applies else None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


G = TypeVar("G", bound="Options")


class Options:
    """What every group can do: be built from keywords or a command's parameters, and say itself as flags."""

    KEYWORD: ClassVar[str]
    """the API keyword the group travels under whole (``recalibrate(..., data_options=DataOptions(...))``)"""

    @classmethod
    def of(cls: type[G], options: G | None = None, **given) -> G:
        """``options`` with the keyword arguments ``given`` on top; an unknown keyword is a TypeError, as for
        any Python call."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                            f"{cls.__name__} are {', '.join(sorted(names))}")
        return replace(options or cls(), **_normalised(given))

    @classmethod
    def picked(cls: type[G], values: dict[str, Any]) -> G:
        """The group from a command's parameters (``locals()``), taken by field name."""
        names = {f.name for f in fields(cls)}
        return cls(**_normalised({k: v for k, v in values.items() if k in names}))

    def given(self) -> dict[str, object]:
        """The options that differ from their defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != _default(f)}

    def recorded(self) -> dict[str, Any]:
        """Every field, as JSON holds it (paths as strings): what a report records to repeat the run."""
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v for f in fields(self)}

    def as_argv(self, baseline: Options | None = None, leave: frozenset[str] = frozenset()) -> list[str]:
        """The flags that give this group again on a command line: those that differ from ``baseline`` (default:
        the defaults), except the fields ``leave``."""
        words: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in leave or value == (getattr(baseline, f.name) if baseline is not None else _default(f)):
                continue
            flag = f.metadata["flag"]
            if isinstance(value, bool):
                words += [flag] if value else []
            elif f.name == "image_size":
                words += [flag, *map(str, value)]
            elif isinstance(value, tuple):
                words += [w for v in value for w in (flag, str(v))]
            elif value is not None:
                words += [flag, str(value)]
        return words


def _default(f):
    return f.default if f.default_factory is MISSING else f.default_factory()


def _normalised(given: dict) -> dict:
    """Repeatable flags come as lists (typer) or any iterable (the API): kept as tuples, so groups stay
    hashable and compare equal however they were built."""
    return {k: tuple(v or ()) if k in _TUPLES else tuple(v) if isinstance(v, list) else v
            for k, v in given.items()}


def grouped(given: dict, *groups: tuple[type[Options], Options | None]) -> tuple:
    """The API's keyword arguments shared out among option groups by field name (the first group that has a
    field takes it), each on top of the group passed whole; a keyword no group has is a TypeError."""
    left, built = dict(given), []
    for cls, whole in groups:
        names = {f.name for f in fields(cls)}
        built.append(cls.of(whole, **{k: left.pop(k) for k in list(left) if k in names}))
    if left:
        known = sorted({f.name for cls, _ in groups for f in fields(cls)})
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, sorted(left)))}; options are "
                        f"{', '.join(known)}")
    return tuple(built)


@dataclass(frozen=True)
class LoadOptions(Options):
    """How a checkpoint is to be loaded."""

    KEYWORD: ClassVar[str] = "options"

    custom_objects: Path | None = option(
        None, "--custom-objects", "Keras: a .py file whose Keras classes are needed to load the model (it is run).",
        applies="keras", panel="Loading: Keras")
    unsafe: bool = option(False, "--unsafe", "Keras: turn safe_mode off (runs Lambda bytecode).", applies="keras",
                          panel="Loading: Keras")
    arch: str | None = option(None, "--arch", "torch state_dict: MODULE:CALLABLE or FILE.py:CALLABLE that builds the "
                              "module.", applies="torch", panel="Loading: PyTorch")
    arch_kwargs: str | None = option(None, "--arch-kwargs", "torch: JSON keyword arguments for --arch.",
                                     applies="torch", panel="Loading: PyTorch")
    key: str | None = option(None, "--key", "torch checkpoint dict: the entry holding the state_dict.",
                             applies="torch", panel="Loading: PyTorch")
    prefix: str | None = option(None, "--prefix", "torch state_dict: the prefix its keys carry before the --arch "
                                "module's own (model., net.) [default: the one that fits].", applies="torch",
                                panel="Loading: PyTorch")
    trust_pickle: bool = option(False, "--trust-pickle", "torch: allow full pickled modules (runs code).",
                                applies="torch", panel="Loading: PyTorch")
    trust_code: bool = option(False, "--trust-code", "torch: allow TorchScript archives; SavedModel and TF1: allow "
                              "graph ops with side effects or file access (both run the file's code).",
                              applies="torch,savedmodel,tf1", panel="Loading: PyTorch")
    safe_globals: tuple[str, ...] = option(None, "--safe-global", "torch: allow one more global (mod.Name) in "
                                           "weights_only loading; repeatable.", applies="torch",
                                           panel="Loading: PyTorch", factory=tuple)
    signature: str = option("serving_default", "--signature", "SavedModel: the serving signature to run.",
                            applies="savedmodel", panel="Loading: SavedModel")
    input_name: str | None = option(None, "--input", "SavedModel: the signature input to feed; ONNX: the graph "
                                    "input; TF1: the placeholder (or any tensor); when there are several.",
                                    applies="savedmodel,onnx,tf1", panel="Loading: SavedModel / ONNX / TF1")
    feeds: tuple[str, ...] = option(None, "--feed", "TF1 checkpoint: NAME=VALUE, the value a placeholder takes at "
                                    "inference (keep_prob=1); repeatable. The training flag is found and fed false "
                                    "without it.", applies="tf1", panel="Loading: TF1", factory=tuple)
    step: int | None = option(None, "--step", "TF1 model folder: the checkpoint of this global step [default: the "
                              "latest, from its checkpoint file].", applies="tf1", panel="Loading: TF1")
    amp: str | None = option(None, "--amp", "PyTorch: run the forward under torch.autocast in bf16 or fp16 (faster "
                             "on GPUs; BN statistics still accumulate in float32). [default: off]", applies="torch",
                             panel="Loading: PyTorch")

    def foreign(self, framework: str) -> list[tuple[str, tuple[str, ...]]]:
        """(flag, the formats it applies to) of each given option that the format ``framework`` cannot use."""
        given = self.given()
        return [(f.metadata["flag"], f.metadata["applies"]) for f in fields(self)
                if f.name in given and framework not in f.metadata["applies"]]


_TUPLES = frozenset(f.name for f in fields(LoadOptions) if f.default_factory is tuple)


@dataclass(frozen=True)
class DataOptions(Options):
    """How calibration (or verification) data becomes batches."""

    KEYWORD: ClassVar[str] = "data_options"

    batch_size: int = option(32, "--batch-size", "Samples per batch.", panel="Data")
    seed: int = option(0, "--seed", "Shuffle seed; the same seed gives bit-identical output.", panel="Data")
    samples: int | None = option(None, "--samples", "Use at most N samples [default: all].", panel="Data")
    image_size: tuple[int, int] | None = option(None, "--image-size", "Resize images to H W [default: the model's "
                                                "declared input size].", panel="Data")
    preprocess: str | None = option(None, "--preprocess", "Image scaling: unit [0,1], raw 0..255, tf [-1,1], caffe, "
                                    "imagenet; or a library's preset, keras:APPLICATION (keras:mobilenet_v2) or "
                                    "torchvision:WEIGHTS (torchvision:ResNet50_Weights.DEFAULT) [default: what the "
                                    "model folder declares (timm, Hugging Face), else unit].", panel="Data")
    skip_bad: bool = option(False, "--skip-bad", "Skip undecodable images (counted) instead of failing.",
                            panel="Data")
    input_index: int = option(0, "--input-index", "Which element of a tuple batch is the input.", panel="Data")
    workers: int | None = option(None, "--workers", "Threads decoding images [default: the CPUs this process may "
                                 "use].", panel="Data")
    fast_jpeg: bool = option(False, "--fast-jpeg", "Decode large JPEGs at a reduced DCT scale, then resize: faster, "
                             "not identical (1024x768 -> 224: means within 1e-4 std, variances within 0.6%).",
                             panel="Data")
    cache_mb: float | None = option(None, "--cache-mb", "--mode eval on an image folder: decode once and keep the "
                                    "samples for the passes when they fit this many MB (0: never; the values are the "
                                    "same either way) [default: a quarter of the memory available].", panel="Data")

    def __post_init__(self):
        if self.cache_mb is not None and not self.cache_mb >= 0:
            raise InputError(f"--cache-mb must be >= 0, got {self.cache_mb:g}")


@dataclass(frozen=True)
class RecalibrationOptions(Options):
    """What the recalibration loop does."""

    KEYWORD: ClassVar[str] = "recalibration"

    mode: str = option("train", "--mode", "train: BN uses batch statistics while measured, one pass (PreciseBN). "
                       "eval: inference-consistent fixed point over repeated passes.", panel="Recalibration")
    tol: float = option(1e-4, "--tol", "eval mode: stop when no statistic moves more than this (in std units).",
                        panel="Recalibration")
    max_passes: int | None = option(None, "--max-passes", "eval mode: at most this many passes, the PreciseBN start "
                                    "included [default: 50].", panel="Recalibration")
    eval_batch_size: int | None = option(None, "--eval-batch-size", "eval mode: samples per forward in the passes "
                                         "after the start, --batch-size batches joined (no autograd runs: larger "
                                         "forwards cost memory only, and need fewer passes) [default: as many as a "
                                         "quarter of the memory available holds].", panel="Recalibration")
    layers: str | None = option(None, "--layers", "Recalibrate only BN layers whose id matches this regex.",
                                panel="Recalibration")
    skip: str | None = option(None, "--skip", "Leave BN layers whose id matches this regex unchanged.",
                              panel="Recalibration")


@dataclass(frozen=True)
class VerifyOptions(Options):
    """How a folded or exported model is checked against its source, and the ONNX it is written as."""

    KEYWORD: ClassVar[str] = "verify"

    samples: int = option(64, "--samples", "Verify on at most N samples of --data (or N generated inputs of the "
                          "declared shape).", panel="Verification")
    atol: float = option(1e-4, "--atol", "Verification: allowed |difference| = atol + rtol * the largest |value| of "
                         "that output or layer in the source (float32 errs relative to the size of what it sums).",
                         panel="Verification")
    rtol: float = option(1e-4, "--rtol", "Verification: see --atol.", panel="Verification")
    noise_margin: float = option(16.0, "--noise-margin", "Verification: beyond atol/rtol, a folded layer or output may "
                                 "differ by this many times float32's own error there (the source's change when its "
                                 "input moves by two ulps; deep nets accumulate it), never by 1e-3 relative; 0: "
                                 "atol/rtol alone.", panel="Verification")
    opset: int = option(17, "--opset", "ONNX opset.", panel="Output")

    def __post_init__(self):
        if not (self.atol >= 0 and self.rtol >= 0 and self.noise_margin >= 0):
            raise InputError(f"--atol, --rtol and --noise-margin must be >= 0, got {self.atol:g}, {self.rtol:g} and "
                             f"{self.noise_margin:g}")


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


def on_gpu(device: str, sees_gpu: bool, missing: str) -> bool:
    """Whether a run asked for with ``device`` goes to the GPU, given whether the framework sees one; every wing
    decides alike: auto takes a GPU where there is one, and asking for one that is not there is refused with
    ``missing`` ("torch sees no CUDA device")."""
    check_device(device)
    if device in ("gpu", "cuda") and not sees_gpu:
        raise InputError(f"--device {device}: {missing} on this machine")
    return device != "cpu" and sees_gpu
