"""PyTorch checkpoint files: which kind a file is, loading it safely, writing it back with only BN buffers changed.

Kinds are told apart by contents, never by suffix: a timm or Hugging Face model folder (``hub``), a TorchScript
archive (``code/`` inside the zip; it runs code, so it needs ``--trust-code``), a ``.safetensors`` state_dict
(``tensorfiles``), or a ``torch.save`` pickle holding a bare state_dict, a training checkpoint dict with a
state_dict under some key, or a full pickled module (``--trust-pickle``).
Pickles are read with ``weights_only=True`` first, so nothing from an untrusted file runs; a file that
needs more says which globals and which flag. Writing loads nothing anew: the object read is saved
again with only the BN tensors overwritten in place, so every other entry keeps its values, dtype,
prefix and storage sharing.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InputError, first_line
from ...options import LoadOptions
from ...user_code import call_spec
from ...writers import atomic_path, storable
from . import hub, tensorfiles


@dataclass
class Checkpoint:
    """What was read from a file, and how to put the repaired BN buffers back into it."""

    path: Path
    kind: str
    """``state_dict``, ``safetensors`` (a state_dict in that format), ``folder`` (a timm / Hugging Face model
    folder), ``checkpoint`` (a dict holding a state_dict), ``module`` (pickled) or ``torchscript``"""
    module: Any
    content: Any = None
    """the object ``torch.load`` returned, written back as it is apart from BN buffers"""
    key: str | None = None
    prefix: str = ""
    zipped: bool = True
    extra_files: dict = field(default_factory=dict)
    shards: dict = field(default_factory=dict)
    """a model folder's tensors by name -> the safetensors file holding each"""
    declared: Any = None
    """the preprocessing a model folder declares (``data.preprocess.Declared``)"""

    def location(self, name: str) -> str:
        """Where a module state name (``layer1.bn1.running_mean``) lives in the file."""
        return f"{self.key}/{self.prefix}{name}" if self.key is not None else self.prefix + name

    @property
    def state(self):
        """The state_dict in the file (None for modules, which are saved whole)."""
        if self.kind in ("state_dict", "safetensors", "folder"):
            return self.content
        if self.kind == "checkpoint" and isinstance(self.content[self.key], Mapping):
            return self.content[self.key]
        return None


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())


def read(path: Path, options: LoadOptions) -> Checkpoint:
    import torch

    path, key = Path(path), options.key
    if hub.is_weights_folder(path):
        if not hub.is_model_folder(path):  # shards of a state_dict, no config: the module comes from --arch
            state, shards = hub.read_weights(path)
            module, prefix = _module_from_state(state, options, str(path))
            return Checkpoint(path, "folder", module, state, prefix=prefix, zipped=False, shards=shards)
        module, declared = hub.build(path, options)  # the config checked before the weights are read
        state, shards = hub.read_weights(path)
        refuse_integral(state, str(path))
        prefix = fitted(module, state, options.prefix, str(path), f"the {type(module).__name__} its config builds")
        return Checkpoint(path, "folder", module, state, prefix=prefix, zipped=False, shards=shards,
                          declared=declared)
    with open(path, "rb") as f:
        head = f.read(8)
    if tensorfiles.is_safetensors(path, head):
        state = tensorfiles.read(path)
        module, prefix = _module_from_state(state, options, f"{path}")
        return Checkpoint(path, "safetensors", module, state, prefix=prefix, zipped=False)
    if is_torchscript(path):
        if not options.trust_code:
            raise InputError(f"{path}: TorchScript archive: loading it runs the code it holds; "
                             "pass --trust-code if you trust the file")
        return _read_torchscript(path)
    content = _unpickle(path, options.trust_pickle, options.safe_globals)
    zipped = zipfile.is_zipfile(path)
    if isinstance(content, torch.nn.Module):
        return Checkpoint(path, "module", content, content, zipped=zipped)
    if _is_state_dict(content):
        if key is not None:
            raise InputError(f"{path}: --key {key!r}: the file is a bare state_dict, not a checkpoint dict; "
                             "leave --key out")
        module, prefix = _module_from_state(content, options, f"{path}")
        return Checkpoint(path, "state_dict", module, content, prefix=prefix, zipped=zipped)
    if isinstance(content, Mapping):
        key = _choose_key(content, key, path)
        value = content[key]
        if isinstance(value, torch.nn.Module):
            return Checkpoint(path, "checkpoint", value, content, key=key, zipped=zipped)
        module, prefix = _module_from_state(value, options, f"{path} [{key!r}]")
        return Checkpoint(path, "checkpoint", module, content, key=key, prefix=prefix, zipped=zipped)
    raise InputError(f"{path}: holds a {type(content).__name__}, not a state_dict, a checkpoint dict or a module")


def write(checkpoint: Checkpoint, output: Path, buffers: dict[str, Any]) -> None:
    """Save ``checkpoint`` to ``output`` atomically; ``buffers`` maps module state names to new values.

    State-dict files get those tensors overwritten in place (dtype and storage kept); modules and
    TorchScript archives already hold the new buffers and are saved whole (extra files kept).
    """
    import torch

    state = checkpoint.state
    if state is not None:
        with torch.no_grad():
            for name, value in buffers.items():
                stored = state[checkpoint.prefix + name]
                numpy_type = torch.float32 if stored.dtype == torch.bfloat16 else stored.dtype  # the same range
                storable(value.detach().cpu().double().numpy(), torch.empty(0, dtype=numpy_type).numpy().dtype,
                         f"{checkpoint.path}: {checkpoint.location(name)}")
            for name, value in buffers.items():  # all checked first: a refusal leaves the object as it was
                state[checkpoint.prefix + name].copy_(value)
    changed = {checkpoint.prefix + n: state[checkpoint.prefix + n] for n in buffers} if state is not None else {}
    if checkpoint.kind == "folder":
        hub.write(checkpoint.path, Path(output), changed, checkpoint.shards)
        return
    if checkpoint.kind == "safetensors":
        tensorfiles.write(checkpoint.path, Path(output), changed)
        return
    with atomic_path(Path(output)) as tmp, open(tmp, "wb") as f:  # a file object: a refused write stays an OSError
        if checkpoint.kind == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))  # torch.jit's own deprecation
                torch.jit.save(checkpoint.module, f, _extra_files=checkpoint.extra_files)
        else:
            torch.save(checkpoint.content, f, _use_new_zipfile_serialization=checkpoint.zipped)


def _read_torchscript(path: Path) -> Checkpoint:
    import torch

    with zipfile.ZipFile(path) as z:
        extra = {n.split("/extra/", 1)[1]: "" for n in z.namelist() if "/extra/" in n}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))  # torch.jit's own deprecation
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # TorchScript raises RuntimeError or its own C++ error types
        raise InputError(f"{path}: cannot load the TorchScript archive ({first_line(exc)})") from None
    return Checkpoint(path, "torchscript", module, extra_files=extra)


def _unpickle(path: Path, trust_pickle: bool, safe_globals) -> Any:
    import torch

    allowed = [(_import_global(name), name) for name in safe_globals]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise InputError(_refusal(path, exc)) from None
    except Exception as exc:
        raise InputError(f"{path}: cannot read the torch file ({first_line(exc)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(f"{path}: unpickling failed ({type(exc).__name__}: {first_line(exc)}); "
                         "the classes it names must be importable") from None


def _refusal(path: Path, exc: Exception) -> str:
    """Why weights-only loading refused the file, the globals it wants and the flags that allow them."""
    import torch

    try:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except pickle.UnpicklingError as damage:  # the archive's pickle itself is broken: no flag would help
        return f"{path}: damaged torch file, its pickle cannot be read ({first_line(damage)})"
    except Exception:  # legacy (non-zip) files: read the names from torch's message
        wanted = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    if not wanted:
        return (f"{path}: weights-only loading failed ({first_line(exc)}); "
                "pass --trust-pickle only if you trust the file")
    names = _names(sorted(set(wanted)))
    if any(name.startswith("torch.nn.modules.") for name in wanted):
        return (f"{path}: a full pickled module (it needs {names}); unpickling it runs code from the file: "
                "pass --trust-pickle if you trust it")
    return (f"{path}: weights-only loading refused globals {names}; allow plain-data ones with "
            "--safe-global NAME (once per name), or pass --trust-pickle if you trust the file (runs code)")


def _import_global(name: str):
    """The object ``--safe-global mod.Name`` names (importing its module is the user's explicit choice)."""
    import importlib

    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise InputError(f"--safe-global {name}: cannot import it (expected module.Name)")


def _is_state_dict(value) -> bool:
    import torch

    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _choose_key(content: Mapping, key: str | None, path: Path) -> str:
    """The entry holding the model: ``--key``, or the only state_dict / module among the entries."""
    import torch

    candidates = [k for k, v in content.items() if _is_state_dict(v) or isinstance(v, torch.nn.Module)]
    if key is not None:
        if key not in candidates:
            found = f"entries holding one: {', '.join(map(str, candidates))}" if candidates else "none does"
            raise InputError(f"{path}: --key {key!r} does not hold a state_dict or module ({found})")
        return key
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        keys = ", ".join(map(str, list(content)[:12]))
        raise InputError(f"{path}: no entry of this checkpoint dict holds a state_dict (entries: {keys})")
    raise InputError(f"{path}: several entries hold a state_dict ({', '.join(map(str, candidates))}); "
                     "choose one with --key")


def _module_from_state(state: Mapping, options: LoadOptions, where: str):
    """Build ``--arch`` and load ``state`` into it strictly; returns the module and the stripped prefix."""
    refuse_integral(state, where)
    if not options.arch:
        raise InputError(f"{where}: a state_dict holds weights only; give --arch MODULE:CALLABLE or "
                         "FILE.py:CALLABLE that builds the module")
    module = _built(options.arch, options.arch_kwargs)
    return module, fitted(module, state, options.prefix, where, f"--arch {options.arch}")


def refuse_integral(state: Mapping, where: str) -> None:
    """Statistics stored in an integer dtype could only be truncated into it: refused before any work."""
    import torch

    integral = next((k for k, v in state.items() if k.endswith(("running_mean", "running_var"))
                     and isinstance(v, torch.Tensor) and not v.is_floating_point()), None)
    if integral is not None:
        raise InputError(f"{where}: {integral} is stored as {state[integral].dtype}, which cannot hold BN "
                         "statistics")


def _built(arch: str, arch_kwargs: str | None):
    import torch

    try:
        kwargs = json.loads(arch_kwargs) if arch_kwargs else {}
    except json.JSONDecodeError as exc:
        raise InputError(f"--arch-kwargs: not valid JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise InputError("--arch-kwargs: expected a JSON object of keyword arguments")
    build = call_spec(arch, "--arch")
    try:
        module = build(**kwargs)
    except Exception as exc:
        raise InputError(f"--arch {arch}: building the module failed: "
                         f"{type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"--arch {arch}: returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def fitted(module, state: Mapping, prefix: str | None, where: str, built_by: str) -> str:
    """Load ``state`` into ``module`` strictly, under the prefix that fits (``--prefix`` where given); returns
    that prefix. ``built_by`` names what built the module in the messages."""
    found = _fitting_prefix(state, set(module.state_dict()), prefix, f"{where}: does not fit {built_by}")
    if found and prefix is None:
        warnings.warn(f"{where}: the {built_by} module's keys are stored under {found!r}; the other entries are kept "
                      "as they are", UserWarning, stacklevel=3)
    try:
        result = module.load_state_dict(_stripped(state, found), strict=False)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:  # modules' own load hooks raise any of these
        raise InputError(f"{where}: does not fit {built_by}: {' '.join(str(exc).split())}") from None
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"{where}: does not fit {built_by}: {_misfit(result.missing_keys, result.unexpected_keys)}")
    return found


def _fitting_prefix(state: Mapping, wanted: set[str], given: str | None, misfit: str) -> str:
    """The prefix under which the stored keys are exactly the module's own (``module.`` of DDP, ``_orig_mod.`` of
    torch.compile, ``model.`` of a LightningModule attribute, any other): ``--prefix`` where given, else the one
    that fits; entries outside it are other parts of the checkpoint, kept as they are. Several that fit need
    ``--prefix``; none is refused with ``misfit`` and what differs, in counts and a few names."""
    if given is not None:
        candidates = [given]
    else:
        anchor = max(wanted, key=len, default="")
        candidates = sorted({k[:len(k) - len(anchor)] for k in state if k.endswith(anchor)
                             and (len(k) == len(anchor) or k[len(k) - len(anchor) - 1] == ".")}) or [""]
    under = {p: {k[len(p):] for k in state if k.startswith(p)} for p in candidates}  # the stored keys, stripped
    fitting = [p for p in candidates if under[p] == wanted]
    if len(fitting) == 1:
        return fitting[0]
    if len(fitting) > 1:
        raise InputError(f"{misfit}: its keys are stored under each of the prefixes "
                         f"{', '.join(repr(p) for p in fitting)}; name one with --prefix")
    closest = min(candidates, key=lambda p: len(under[p] ^ wanted))
    stored = under[closest]
    where = f" under prefix {closest!r}" if closest else ""
    raise InputError(f"{misfit}{where}: {_misfit(sorted(wanted - stored), sorted(stored - wanted))}")


def _misfit(missing, unexpected) -> str:
    """What differs between a module's keys and the stored ones, short: counts and a few of each."""
    return f"{len(missing)} missing key(s) ({_names(missing)}), {len(unexpected)} unexpected ({_names(unexpected)})"


def _stripped(state: Mapping, prefix: str) -> Mapping:
    """The entries of ``state`` under ``prefix``, without it, its ``_metadata`` (BN versions) renamed to match."""
    if not prefix:
        return state
    out = OrderedDict((k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix))
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict((k[len(prefix):] if k.startswith(prefix) else "", v)
                                    for k, v in metadata.items() if k.startswith(prefix) or k == prefix[:-1])
    return out


def _names(keys) -> str:
    keys = list(keys)
    if not keys:
        return "(none)"
    shown = ", ".join(keys[:8])
    return shown + (f", … (+{len(keys) - 8} more)" if len(keys) > 8 else "")

