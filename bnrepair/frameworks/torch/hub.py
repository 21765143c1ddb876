"""Model folders as the Hugging Face hub's libraries save them, built by their own library, offline.

``transformers``' ``save_pretrained`` writes a ``config.json`` naming the class in ``architectures``; timm's
``save_pretrained`` / hub export writes one with ``architecture`` and ``pretrained_cfg``. Both keep the weights
in ``model.safetensors`` or in shards that ``model.safetensors.index.json`` names. The module is built from the
config with random weights (nothing downloaded; a config that asks for the repository's own code, ``auto_map``,
only with ``--trust-code``), then the stored tensors are loaded into it strictly. What the folder declares about
its inputs (timm's ``pretrained_cfg``, a ``preprocessor_config.json``) becomes the library's own image transform.
Writing copies the folder and patches the BN tensors' bytes in the shards that hold them: every other file, and
every other byte of those shards, stays as saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath

from ...data.preprocess import Declared
from ...errors import InputError, first_line, require
from ...options import LoadOptions
from ...writers import replace_folder, scratch_folder
from . import tensorfiles

CONFIG, WEIGHTS, INDEX, PREPROCESSOR = ("config.json", "model.safetensors", "model.safetensors.index.json",
                                        "preprocessor_config.json")


def is_weights_folder(path: Path) -> bool:
    """A folder of safetensors weights: a model folder, or a state_dict's shards for ``--arch`` (no config)."""
    return path.is_dir() and ((path / WEIGHTS).is_file() or (path / INDEX).is_file())


def is_model_folder(path: Path) -> bool:
    return is_weights_folder(path) and (path / CONFIG).is_file()


def shards(folder: Path) -> list[Path]:
    """The weight files, in order: ``model.safetensors``, or every shard the index names (each must be a file
    beside it)."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    index = folder / INDEX
    try:
        names = json.loads(index.read_text())["weight_map"].values()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{index}: not a safetensors index (no weight_map: {first_line(exc)})") from None
    files = []
    for name in dict.fromkeys(names):
        if not isinstance(name, str) or len(PurePosixPath(name).parts) != 1 or name in ("..", "."):
            raise InputError(f"{index}: names shard {name!r}, which is not a file beside it")
        if not (folder / name).is_file():
            raise InputError(f"{index}: names shard {name}, which is missing")
        files.append(folder / name)
    return files


def read_weights(folder: Path) -> tuple[dict, dict[str, Path]]:
    """Every stored tensor by name, and the file each lies in."""
    state, where = {}, {}
    for path in shards(folder):
        for name, tensor in tensorfiles.read(path).items():
            state[name], where[name] = tensor, path
    return state, where


def config(folder: Path) -> dict:
    try:
        found = json.loads((folder / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{folder / CONFIG}: not readable JSON ({first_line(exc)})") from None
    if not isinstance(found, dict) or not ("architecture" in found or found.get("architectures")):
        raise InputError(f"{folder / CONFIG}: names no model (neither timm's 'architecture' nor transformers' "
                         "'architectures')")
    return found


def build(folder: Path, options: LoadOptions):
    """The module the folder's config describes, random weights, and what the folder declares about its inputs
    (``Declared`` or None)."""
    found = config(folder)
    if "architecture" in found:
        return _timm(folder, found)
    return _transformers(folder, found, options.trust_code)


def _timm(folder: Path, found: dict):
    require(("timm",), f"{folder}: a timm model folder", "hub")
    import timm
    from timm.data import create_transform, resolve_data_config

    try:
        module = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=False)
    except Exception as exc:  # an unknown architecture, arguments it does not take
        raise InputError(f"{folder / CONFIG}: timm {timm.__version__} cannot build {found['architecture']!r} "
                         f"({first_line(exc)})") from None
    data = resolve_data_config({}, model=module)
    transform = create_transform(**data)
    described = (f"timm eval transform: crop_pct {data['crop_pct']:g} ({data['interpolation']}), centre crop "
                 f"{data['input_size'][-1]}, mean {_rounded(data['mean'])} std {_rounded(data['std'])}")
    return module.eval(), Declared(described, f"declared by the model in {CONFIG} (pretrained_cfg)",
                                   lambda image: transform(image).numpy().transpose(1, 2, 0))


def _transformers(folder: Path, found: dict, trust_code: bool):
    require(("transformers",), f"{folder}: a Hugging Face model folder", "hub")
    import transformers

    name = found["architectures"][0]
    remote = found.get("auto_map")
    if remote and not trust_code:
        raise InputError(f"{folder / CONFIG}: {name} is the repository's own code (auto_map); building it runs "
                         "that code: pass --trust-code if you trust the folder")
    try:
        settings = transformers.AutoConfig.from_pretrained(folder, local_files_only=True,
                                                           trust_remote_code=trust_code)
    except Exception as exc:  # an unknown model_type, a damaged config
        raise InputError(f"{folder / CONFIG}: transformers {transformers.__version__} cannot read it "
                         f"({first_line(exc)})") from None
    if remote:
        auto = next((k for k, v in remote.items() if str(v).endswith(f".{name}")), None)
        model_class = getattr(transformers, auto or "AutoModel")
        module = model_class.from_config(settings, trust_remote_code=True)
    else:
        model_class = getattr(transformers, name, None)
        if model_class is None:
            raise InputError(f"{folder / CONFIG}: names architecture {name!r}, which transformers "
                             f"{transformers.__version__} does not have")
        module = model_class(settings)
    return module.eval(), _image_processor(folder, transformers)


def _image_processor(folder: Path, transformers):
    if not (folder / PREPROCESSOR).is_file():
        return None
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{folder / PREPROCESSOR}: transformers cannot build its image processor "
                         f"({first_line(exc)})") from None
    settings = processor.to_dict()
    described = (f"transformers {type(processor).__name__}: size {settings.get('size')}, crop_pct "
                 f"{settings.get('crop_pct')}, mean {_rounded(settings.get('image_mean'))} std "
                 f"{_rounded(settings.get('image_std'))}")
    return Declared(described, f"declared by the model in {PREPROCESSOR}",
                    lambda image: processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0))


def _rounded(values) -> str:
    return "None" if values is None else "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def write(source: Path, dest: Path, tensors: dict, where: dict[str, Path]) -> None:
    """``source`` copied to the folder ``dest`` (set in place when complete) with only ``tensors`` rewritten, in
    the shards that hold them."""
    dest = Path(dest)
    with scratch_folder(dest) as tmp:
        staged = tmp / dest.name
        shutil.copytree(source, staged)  # links followed: a hub cache's snapshot links to its blobs
        for shard in {where[name] for name in tensors}:
            tensorfiles.patch(staged / shard.relative_to(source),
                              {n: t for n, t in tensors.items() if where[n] == shard}, shard)
        replace_folder(staged, dest)
