"""How calibration data must look for a given model, and an early check that it does.

Both read only the model's ``ModelGraph`` (declared input shape and layout), so they run before any batch
is decoded and serve every command that reads data: recalibrate, diagnose, and verification in deploy.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..graph import ModelGraph
from ..options import DataOptions
from .preprocess import chosen
from .sources import ArraySource, ImageFolder, ImageSpec

MAX_SIDE = 16384
"""the largest --image-size side: a 16384 x 16384 RGB float32 image alone takes 3 GiB"""


def image_spec(graph: ModelGraph, options: DataOptions = DataOptions()) -> ImageSpec:
    """How images must be decoded for this model: its declared input size, channels, layout and preprocessing,
    unless the options say otherwise."""
    image_size = options.image_size
    shape = graph.input_shape
    channels, size = 3, None
    if shape is not None and len(shape) == 3:
        c, h, w = shape if graph.channels_first else (shape[2], shape[0], shape[1])
        channels = c or 3
        if h and w:
            size = (h, w)
    if image_size:
        size = tuple(int(v) for v in image_size)
        if not all(1 <= v <= MAX_SIDE for v in size):
            raise InputError(f"--image-size {size[0]} {size[1]}: height and width must be between 1 and {MAX_SIDE}")
    how, source, transform = chosen(options.preprocess, graph.preprocessing)
    if transform is not None:
        size = None  # the library's own resize and crop make the input size
    return ImageSpec(size=size, channels=channels, preprocess=how, channels_first=graph.channels_first,
                     fast_jpeg=options.fast_jpeg, transform=transform, source=source)


def check_fits(graph: ModelGraph, data) -> None:
    """Fail early, naming the file, when the samples cannot be the model's input."""
    shape = graph.input_shape
    source = getattr(data, "source", None)
    if shape is None or source is None:
        return
    if isinstance(source, ImageFolder) and len(shape) != 3:
        raise InputError(f"{source.root}: image folder given, but the model takes inputs of shape {shape}")
    if isinstance(source, ArraySource):
        got = source.sample_shape
        if len(got) != len(shape) or any(want is not None and want != have for want, have in zip(shape, got)):
            raise InputError(f"{source.origin}: samples have shape {got}, the model takes {shape}")


def preprocessing(graph: ModelGraph, options: DataOptions, data) -> dict[str, str]:
    """What a report says of the preprocessing: the scaling or transform images get and where it came from;
    arrays and batches are used as given."""
    if not (isinstance(data, (str, Path)) and Path(data).is_dir()):
        return {"name": "none", "source": "arrays and batches are used as given"}
    spec = image_spec(graph, options)
    return {"name": spec.preprocess, "source": spec.source}
