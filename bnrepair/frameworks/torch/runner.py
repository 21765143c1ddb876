"""PyTorch: load checkpoints (see ``files``), measure BN inputs, write back only BN buffers.

Eager modules are measured with hooks on each chosen BN module (``_Probe``) while every module, the BN
ones included, runs its own ``forward`` in ``eval()``; in ``train`` mode a BN module is lent the batch's
statistics in place of its running buffers for the length of its call. TorchScript modules get the same
measurement inserted into a copy of their graph (``script``). Training flags are restored after every
batch, so the module is only ever seen as the user left it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from pathlib import Path

import numpy as np

from ...drift import corrected
from ...errors import BnrepairError, InputError, NoBatchNorm, first_line
from ...graph import BNLayer, ModelGraph
from ...moments import Moments
from ...options import LoadOptions, check_amp, on_gpu
from . import files as torch_files
from .script import call_counts as script_call_counts
from .script import capture_function


def import_torch():
    try:
        import torch
    except ImportError as exc:
        raise BnrepairError(f"PyTorch checkpoints need torch ({exc}); "
                            "from the bnrepair checkout: pip install '.[torch]'") from None
    return torch


def load_file(path: Path, options: LoadOptions, device: str = "auto") -> "TorchRunner":
    import_torch()
    check_amp(options.amp)
    checkpoint = torch_files.read(Path(path), options)
    return TorchRunner(checkpoint.module, device=device, checkpoint=checkpoint, amp=options.amp)

_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""per module: what runners built from the module alone (fx's call counts, TorchScript capture functions), kept for
the next call on the same module (``update_bn``-style use, once per epoch) and released with the module"""


def built(module) -> dict:
    """What earlier runners built from ``module``, by key, emptied where the module's structure (its sub-modules'
    names, types and forwards) changed since; a runner reads it once and adds what it builds."""
    structure = tuple((name, type(m), m.__dict__.get("forward"))
                      for name, m in module.named_modules(remove_duplicate=False))
    entry = _BUILT.setdefault(module, {})
    if entry.get("structure") != structure:
        entry.clear()
        entry["structure"] = structure
    return entry


class TorchRunner:
    """``protocols.Runner`` for a ``torch.nn.Module`` or ScriptModule."""

    framework = "torch"

    def __init__(self, model, device: str = "auto", checkpoint: torch_files.Checkpoint | None = None,
                 amp: str | None = None):
        torch = import_torch()
        self.amp = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]  # checked by load_file
        """``--amp``: the forward runs under ``torch.autocast`` in that dtype (BN inputs' moments are still taken
        in float32 and merged in float64); an in-memory module also runs inside the caller's own autocast"""
        self.torch = torch
        self.module = _unwrap(torch, model)
        self.checkpoint = checkpoint
        self.scripted = isinstance(self.module, torch.jit.ScriptModule)
        origin = str(checkpoint.path) if checkpoint else "module"
        self.device = _resolve_device(torch, device, self.module, owned=checkpoint is not None)
        self.dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)
        if checkpoint is not None:
            self.module.to(self.device)
        found = _bn_modules(torch, self.module, self.scripted, origin)
        if not found:
            raise NoBatchNorm(f"{origin}: the model has no BatchNorm layers")
        self._by_id = {layer_id: m for layer_id, m, _, _ in found}
        self.graph = ModelGraph("torch", origin, [self._describe(*f) for f in found],
                                input_shape=_input_shape(self.module), channels_first=True, unbiased_var=True,
                                momentum_is_decay=False, default_eps=1e-5,
                                frozen_means="momentum 0, no trainable weight or bias, or a FrozenBatchNorm2d",
                                momentum_stored=checkpoint is None or checkpoint.state is None,
                                preprocessing=checkpoint.declared if checkpoint else None)
        self._modules = [m for _, m in self.module.named_modules()]
        self._built = built(self.module)
        self._scratch: dict = {}
        self._kernel_ok: dict[str, bool] = {}

    @property
    def model(self):
        return self.module

    def weights(self):
        statistics = {id(t) for m in self._by_id.values() for t in (getattr(m, "running_mean", None),
                                                                    getattr(m, "running_var", None)) if t is not None}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if id(tensor) not in statistics and tensor.is_floating_point():
                yield name, tensor.detach().cpu().numpy()

    def exporter(self):
        """The same backend for TorchScript: exported by torch's TorchScript-based ONNX exporter as it is; its
        ``fold`` refuses a ScriptModule (fx cannot trace one)."""
        from . import fold

        return fold

    def folder(self):
        from . import fold

        return fold

    def _describe(self, layer_id: str, m, kind: str, lookalike: bool) -> BNLayer:
        mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        tracks = mean is not None and var is not None
        weight = getattr(m, "weight", None)
        momentum = getattr(m, "momentum", None)
        trainable = [p.requires_grad for p in m.parameters(recurse=False)]
        stats = {}
        if tracks:
            stats = {"mean": f"{layer_id}.running_mean", "var": f"{layer_id}.running_var"}
            if self.checkpoint is not None and self.checkpoint.state is not None:
                stats = {k: self.checkpoint.location(v) for k, v in stats.items()}
        return BNLayer(
            id=layer_id, channels=int(mean.numel() if tracks else getattr(m, "num_features", 0)), axis=1,
            eps=float(getattr(m, "eps", 1e-5)), momentum=None if momentum is None else float(momentum),
            center=getattr(m, "bias", None) is not None, scale=weight is not None,
            frozen=lookalike or momentum == 0 or (bool(trainable) and not any(trainable)),
            mean=_numpy(mean), var=_numpy(var), locations=stats, tracks_stats=tracks, kind=kind)

    # --- runner protocol ---------------------------------------------------------------------------
    def infer(self, inputs, mode: str = "eval"):
        """The model's outputs as numpy; ``mode="train"``: BN layers use batch statistics, nothing else does."""
        ids = [bn.id for bn in self.graph.bn_layers if bn.tracks_stats] if mode == "train" else []
        return _numpy_outputs(self._run(inputs, frozenset(ids), ids)[0])

    def collect(self, inputs, mode: str, ids: list[str], batch_stats=frozenset(),
                corrections=None) -> dict[str, Moments]:
        train = frozenset(ids) if mode == "train" else frozenset(batch_stats)
        moments = self._to_host(self._run(inputs, train, ids, corrections)[1], ids)
        if mode == "train":
            self._judge_kernel(moments)
        return moments

    def _judge_kernel(self, moments: dict[str, Moments]) -> None:
        """After a first train-mode batch: which layers torch's own training kernel may measure from now on.

        Plain ``nn.BatchNorm1d/2d/3d`` only (a subclass's forward may do more in training), and only where the
        batch's |mean| is within 100 std: the kernel sums raw values in float32, whose error grows with the
        mean's size (measured on CPU: |mean| = 100 std errs by 4e-6 std; 1000 std by 3e-5), while our own
        reduction around one sample's values keeps float32 precision for any mean."""
        plain = (self.torch.nn.BatchNorm1d, self.torch.nn.BatchNorm2d, self.torch.nn.BatchNorm3d)
        for layer_id, m in moments.items():
            if layer_id not in self._kernel_ok and m.count > 1:
                var = m.variance(False) + self.graph.layer(layer_id).eps
                self._kernel_ok[layer_id] = (type(self._by_id[layer_id]) in plain
                                             and bool(np.all(np.abs(m.mean) <= 100 * np.sqrt(var))))

    def free_memory(self) -> int | None:
        """Bytes the GPU running the model could still take (eval mode sizes its joined forwards by it); None on
        the CPU, where the host's memory is the bound."""
        if self.device.type != "cuda":
            return None
        return self.torch.cuda.mem_get_info(self.device)[0]

    def call_counts(self) -> dict[str, int] | None:
        """How often the forward calls each BN module, from a symbolic torch.fx trace (no data runs) or the
        TorchScript graph; None when fx cannot trace the module (data-dependent control flow)."""
        if "call counts" not in self._built:
            self._built["call counts"] = self._call_counts()
        return self._built["call counts"]

    def _call_counts(self) -> dict[str, int] | None:
        if self.scripted:
            return script_call_counts(self.module, self._by_id)
        from .fold import trace

        try:
            graph = trace(self.torch, self.module, set(self._by_id)).graph
        except Exception:
            return None
        calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        return {layer_id: calls.get(layer_id, 0) for layer_id in self._by_id}

    def set_stats(self, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        torch = self.torch
        with torch.no_grad():
            for layer_id, (mean, var) in stats.items():
                m = self._by_id[layer_id]
                for name, value in (("running_mean", mean), ("running_var", var)):
                    buffer = getattr(m, name)
                    new = torch.as_tensor(np.asarray(value, np.float64)).to(buffer.dtype)
                    if not buffer.is_floating_point() or not torch.isfinite(new).all():
                        raise InputError(f"{self.graph.source}: {layer_id}.{name} is stored as "
                                         f"{str(buffer.dtype).replace('torch.', '')}, which cannot hold the new "
                                         f"statistics (largest |value| {np.max(np.abs(value)):.3g})")
                    buffer.copy_(new)
                bn = self.graph.layer(layer_id)
                bn.mean, bn.var = np.array(mean, np.float64), np.array(var, np.float64)

    def save(self, output: Path, changed: list[str]) -> None:
        """Write the input file again with only the ``changed`` layers' running_mean / running_var replaced."""
        if self.checkpoint is None:
            raise InputError("an in-memory module has no file to write; save it with torch.save yourself")
        buffers = {f"{layer_id}.{name}": getattr(self._by_id[layer_id], name)
                   for layer_id in changed for name in ("running_mean", "running_var")}
        if self.checkpoint.state is None:
            self.module.to("cpu")  # pickled modules and archives are saved whole, where they were loaded
        torch_files.write(self.checkpoint, Path(output), buffers)

    def cast_input(self, x):
        """numpy or torch batch (or a tuple / dict of them) -> tensors on the device; float64 arrays -> float32."""
        if isinstance(x, dict):
            return {k: self._tensor(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return tuple(self._tensor(v) for v in x)
        return self._tensor(x)

    def _tensor(self, value):
        """Floating data goes to the device in the module's own floating dtype (float64 modules take float64,
        half-precision ones half); other dtypes as they are."""
        torch = self.torch
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != self.dtype:
            value = value.to(self.dtype)
        if not isinstance(value, torch.Tensor) or value.device == self.device:
            return value
        if self.device.type == "cuda" and value.device.type == "cpu":
            if not value.is_pinned():
                value = value.pin_memory()
            return value.to(self.device, non_blocking=True)
        return value.to(self.device)

    # --- capture ----------------------------------------------------------------------------------
    def _run(self, inputs, train: frozenset, ids: list[str], corrections=None):
        """One forward pass, everything in ``eval()``, the ``train`` layers on batch statistics:
        (outputs, [(layer id, count, shift, mean - shift, m2) per BN call])."""
        try:
            with _all_eval(self._modules), self.torch.inference_mode(), self._autocast():
                if not ids:
                    return _call(self.module, inputs), []
                if self.scripted:
                    return self._script_run(inputs, train, ids, corrections or {})
                return self._eager_run(inputs, train, ids, corrections or {})
        except BnrepairError:
            raise
        except self.torch.cuda.OutOfMemoryError:
            raise InputError(f"out of GPU memory on a forward of {_shapes(inputs)}: give a smaller --batch-size "
                             "(in eval mode, --eval-batch-size bounds the passes after the start)") from None
        except (RuntimeError, TypeError, ValueError) as exc:  # the data does not fit the model
            text = first_line(exc)
            raise InputError(f"the model's forward pass failed on a calibration batch ({_shapes(inputs)}): "
                             f"{text}") from exc

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.amp)

    def _eager_run(self, inputs, train: frozenset, ids: list[str], corrections: dict):
        sink: list = []
        probes = [_Probe(self.torch, self._by_id[i], i, train=i in train, sink=sink, scratch=self._scratch,
                         correction=self._correction(corrections.get(i)),
                         kernel=i in train and i not in corrections and self._kernel_ok.get(i, False))
                  for i in ids]
        try:
            for probe in probes:
                probe.attach()
            return _call(self.module, inputs), sink
        finally:
            for probe in probes:
                probe.detach()

    def _correction(self, arrays):
        if arrays is None:
            return None
        return tuple(self.torch.as_tensor(np.asarray(v), dtype=self.torch.float32).to(self.device) for v in arrays)

    def _script_run(self, inputs, train: frozenset, ids: list[str], corrections: dict):
        key = (train, tuple(ids), frozenset(corrections))
        if key not in self._built:
            self._built[key] = capture_function(self.module, train, ids, frozenset(corrections))
        fn, order = self._built[key]
        if isinstance(inputs, dict):
            raise InputError("TorchScript modules take positional inputs; dict batches are not supported")
        carried = [t for i in order if i in corrections for t in self._correction(corrections[i])]
        out = fn(self.module._c, *(inputs if isinstance(inputs, tuple) else (inputs,)), *carried)
        return out[0], [(layer_id, out[1 + 3 * i] // self._by_id[layer_id].running_mean.numel(),
                         self.torch.zeros_like(out[2 + 3 * i]), out[2 + 3 * i], out[3 + 3 * i])
                        for i, layer_id in enumerate(order)]

    def _to_host(self, sink: list, ids: list[str]) -> dict[str, Moments]:
        """One device-to-host copy per batch: every layer's (shift, mean of the shifted input, m2) concatenated,
        then merged in float64 (shift and mean added there: their float32 sum would lose the mean's precision).
        A layer the forward pass did not reach (Inception's auxiliary head in ``eval()``) has no entry."""
        if not sink:
            return {}
        host = self.torch.cat([t.reshape(-1).to(self.torch.float64) for entry in sink for t in entry[2:]])
        host = host.cpu().numpy()
        result: dict[str, Moments] = {}
        offset = 0
        for layer_id, count, shift, _, _ in sink:
            c = shift.numel()
            mean = host[offset:offset + c] + host[offset + c:offset + 2 * c]
            m = Moments.of(count, mean, host[offset + 2 * c:offset + 3 * c])
            offset += 3 * c
            result[layer_id] = result[layer_id].merge(m) if layer_id in result else m
        return result


class _Probe:
    """Measures one BN module's input while the module runs its own ``forward`` (timm's ``BatchNormAct2d`` keeps
    its activation, ``FrozenBatchNorm2d`` its arithmetic, a user subclass whatever it adds).

    A forward pre-hook reduces the input to per-channel (count, mean, M2) on the device (centred on one
    sample, then a mean and a sum of squares). With ``train`` it then lends the module the batch's mean and
    (biased) variance, plus a drift ``correction`` when given, in place of its ``running_mean`` /
    ``running_var`` for that call only, so the module, still in ``eval()``, normalises with batch
    statistics; the forward hook gives the stored buffers back. The buffers' contents,
    ``num_batches_tracked`` and momentum are never touched, and a batch of one cannot trip BatchNorm1d's
    training check.

    ``kernel``: a plain ``nn.BatchNorm1d/2d/3d`` in train mode is instead switched to training for its call,
    with momentum 1 and scratch buffers in place of its own, so torch's fused training kernel both measures
    the batch and normalises with it (one pass fewer than measuring first; the runner allows it where the
    kernel is exact enough: see ``TorchRunner._kernel_ok``).
    """

    def __init__(self, torch, module, layer_id: str, *, train: bool, sink: list, scratch: dict, correction=None,
                 kernel: bool = False):
        self.torch, self.module, self.layer_id, self.train = torch, module, layer_id, train
        self.sink, self.scratch, self.correction, self.kernel = sink, scratch, correction, kernel
        self.handles: list = []
        self.stored: dict | None = None
        self.flags: tuple | None = None
        """(momentum, training, count) while the module's own training kernel measures this call"""

    def attach(self) -> None:
        self.handles = [self.module.register_forward_pre_hook(self.before),
                        self.module.register_forward_hook(self.after)]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._give_back()

    def before(self, module, args):
        torch = self.torch
        x = args[0]
        count = x.numel() // x.shape[1]
        if (self.kernel and count > 1 and (x.is_contiguous() or x.is_cuda)
                and module.running_var.dtype in (torch.float32, torch.float64)):  # half buffers would overflow
            self._give_back()
            buffers = module._buffers
            self.stored = {n: buffers[n] for n in ("running_mean", "running_var", "num_batches_tracked")}
            buffers["running_mean"] = torch.zeros_like(self.stored["running_mean"])
            buffers["running_var"] = torch.ones_like(self.stored["running_var"])
            buffers["num_batches_tracked"] = torch.zeros((), dtype=torch.long, device=x.device)
            self.flags = (module.momentum, module.training, count)
            module.momentum, module.training = 1.0, True
            return
        stats = x if x.dtype in (torch.float32, torch.float64) else x.float()
        dims = (0, *range(2, x.dim()))
        # around one sample's values, within a few std of the mean (the subtraction is exact): float32 then errs
        # by eps x std, not eps x |mean| (activations whose mean dwarfs their spread, as in Inception). The
        # centred copy goes to one scratch buffer reused by every layer and batch: a fresh allocation of that
        # size per BN call costs more than the arithmetic (page faults on CPU)
        shift = stats[(0, slice(None)) + (0,) * (x.dim() - 2)].reshape(1, -1, *([1] * (x.dim() - 2)))
        key = (stats.device, stats.dtype)
        if key not in self.scratch or self.scratch[key].numel() < stats.numel():
            self.scratch[key] = torch.empty(stats.numel(), dtype=stats.dtype, device=stats.device)
        centred = torch.sub(stats, shift, out=self.scratch[key][:stats.numel()].view(stats.shape))
        offset = centred.mean(dims)
        # centred on a sample a few std from the mean, the sum of squares keeps float32 precision; squaring the
        # scratch copy in place and summing is several times faster on CPU than torch.var_mean over these dims
        m2 = centred.square_().sum(dims).sub_(offset.square() * count).clamp_(min=0)
        self.sink.append((self.layer_id, count, shift.reshape(-1), offset, m2))
        if self.train:
            self._give_back()  # a module called twice per forward lends its buffers once per call
            buffers = module._buffers
            self.stored = {name: buffers[name] for name in ("running_mean", "running_var")}
            mean, var = shift.reshape(-1) + offset, m2 / max(count, 1)
            if self.correction is not None:
                mean, var = corrected(mean, var, self.correction, module.eps)
            buffers["running_mean"] = mean.to(self.stored["running_mean"].dtype)
            buffers["running_var"] = var.to(self.stored["running_var"].dtype)

    def after(self, module, args, output):
        if self.flags is not None:  # the training kernel left the batch's mean and unbiased variance here
            buffers, count = module._buffers, self.flags[2]
            dtype = self.torch.promote_types(buffers["running_mean"].dtype, self.torch.float32)
            mean = buffers["running_mean"].to(dtype)
            self.sink.append((self.layer_id, count, self.torch.zeros_like(mean), mean,
                              buffers["running_var"].to(dtype) * (count - 1)))
        self._give_back()

    def _give_back(self) -> None:
        if self.flags is not None:
            self.module.momentum, self.module.training = self.flags[:2]
            self.flags = None
        if self.stored is not None:
            self.module._buffers.update(self.stored)
            self.stored = None


class _all_eval:
    """Every module in ``eval()`` for one batch; each module's own flag restored afterwards."""

    def __init__(self, modules):
        self.modules = modules

    def __enter__(self):
        self.flags = [m.training for m in self.modules]
        for m in self.modules:
            m.training = False

    def __exit__(self, *exc):
        for m, flag in zip(self.modules, self.flags):
            m.training = flag


def _call(module, inputs):
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, tuple):
        return module(*inputs)
    return module(inputs)


def _shapes(inputs) -> str:
    if isinstance(inputs, dict):
        return ", ".join(f"{k}: {_shapes(v)}" for k, v in inputs.items())
    if isinstance(inputs, tuple):
        return ", ".join(_shapes(v) for v in inputs)
    if hasattr(inputs, "shape"):
        return f"{tuple(inputs.shape)} {str(inputs.dtype).replace('torch.', '')}"
    return type(inputs).__name__


def _bn_modules(torch, module, scripted: bool, origin: str) -> list[tuple]:
    """(id, module, kind, frozen look-alike) for every BatchNorm layer, in registration order.

    BatchNorm1d/2d/3d, SyncBatchNorm and materialised LazyBatchNorm are ``_BatchNorm``; any other module
    with running_mean / running_var buffers (torchvision's FrozenBatchNorm2d and look-alikes) normalises
    with fixed statistics and is listed as frozen. InstanceNorm keeps running buffers too and is left out.
    """
    from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
    from torch.nn.parameter import UninitializedBuffer

    found = []
    for name, m in module.named_modules():
        layer_id = name or type(m).__name__
        if scripted:
            kind = m.original_name
            buffers = dict(m.named_buffers(recurse=False))
            is_bn = "BatchNorm" in kind or ("running_mean" in buffers and "running_var" in buffers)
            if is_bn and not kind.startswith("InstanceNorm"):
                found.append((layer_id, m, kind, "BatchNorm" not in kind or kind.startswith("Frozen")))
            continue
        if isinstance(m, _BatchNorm):
            if isinstance(m.running_mean, UninitializedBuffer) or isinstance(m.weight, torch.nn.UninitializedParameter):
                raise InputError(f"{origin}: BN layer {layer_id} is a LazyBatchNorm that is not materialised yet; "
                                 "run the model once (or load its state_dict) first")
            found.append((layer_id, m, type(m).__name__, False))
        elif (not isinstance(m, _NormBase) and isinstance(m._buffers.get("running_mean"), torch.Tensor)
              and isinstance(m._buffers.get("running_var"), torch.Tensor)):
            found.append((layer_id, m, type(m).__name__, True))
    return found


def _unwrap(torch, model):
    """The module that holds the layers: DataParallel / DDP and torch.compile wrappers are looked through."""
    while True:
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _resolve_device(torch, device: str, module, owned: bool):
    """A loaded checkpoint goes where ``device`` says (a name or a ``torch.device``); a module passed in memory
    is never moved."""
    if isinstance(device, torch.device):
        device = device.type
    gpu = on_gpu(device, torch.cuda.is_available(), "torch sees no CUDA device")
    if not owned:
        here = next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))
        want = {"gpu": "cuda"}.get(device, device)
        if want not in ("auto", here.type):
            raise BnrepairError(f"the module is on {here}; move it with module.to({want!r}) or use device='auto'")
        return here
    return torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")


def _input_shape(module):
    """(C, H, W) when the module declares ``example_input_shape``; else unknown."""
    shape = getattr(module, "example_input_shape", None)
    if isinstance(shape, (tuple, list)) and all(isinstance(d, int) or d is None for d in shape):
        return tuple(shape)
    return None


def _numpy_outputs(outputs):
    """Tensors anywhere in the outputs (tuples, lists, dicts) as numpy arrays on the host."""
    if isinstance(outputs, dict):
        return {k: _numpy_outputs(v) for k, v in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        converted = [_numpy_outputs(v) for v in outputs]
        return converted if isinstance(outputs, list) else tuple(converted)
    if hasattr(outputs, "detach"):
        return outputs.detach().cpu().numpy()
    return outputs


def _numpy(tensor) -> np.ndarray:
    if tensor is None:
        return np.zeros(0)
    return tensor.detach().to("cpu", copy=True).double().numpy()
