"""The model zoo: real architectures nobody here wrote, BN statistics broken on purpose, repaired with the CLI
and checked layer by layer against references computed here, independently of bnrepair, in float64.

For each model: build it with random weights (``zoo_models``), replace every BN layer's statistics with
random ones, save it as a user would (torch: a state_dict or a training-checkpoint dict with ``--arch``;
Keras: ``.keras`` or ``.h5``), then run ``bnrepair inspect``, ``recalibrate --mode train`` and
``--mode eval`` on random calibration arrays and compare what was written with

- train: the framework's own training-mode BN (torch ``train()`` on the BN modules only, Keras
  ``training=True`` with every Dropout's rate set to 0), every BN input recorded and pooled;
- eval: the inference-consistent fixed point, iterated here from the train reference until it stops moving.

References run in float64. Errors are in units of the reference std (|Δmean| / σ and |Δvar| / σ², eps
included). The table also gives BN layers found / true, the float32 floor (the framework's own float32
train-mode statistics against the float64 reference: what float32 arithmetic alone costs a deep net), eval
passes, the samples per forward of eval mode's passes after the start and what its run added to the process's
peak memory, and train-mode time over one plain inference pass of the same batches.

    python bench/zoo.py [--framework torch|keras|all] [--only NAME ...] [--samples 64] [--batch-size 16]

torch models need torchvision and timm (``pip install torch==2.14.1 torchvision==0.29.1 timm``); Keras ones
need only Keras. A framework that is not installed is left out with a line saying so.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import zoo_models  # noqa: E402
from memory import peak_rss_mib  # noqa: E402

ARCH = f"{HERE / 'zoo_models.py'}:torch_model"
SAVEDMODEL = "_savedmodel"
LEGACY_H5 = {"ResNet50", "DenseNet121"}
"""saved as legacy .h5 (Keras 3 cannot load every application back from .h5: MobileNetV3's ops need .keras)"""
FAILED = {"passes": 0, "converged": False, "seconds": np.nan, "eval_batch": None, "grew_mib": np.nan}
"""the report of a command that failed (its message goes into the row's note)"""
PASSES = 6
"""eval mode's target: at most this many passes on every model, at the default batch size"""
MAX_PASSES = 300
"""enough for DenseNet121's depth: the point is to measure how many passes eval mode takes"""


@dataclass
class Row:
    model: str
    found: int
    true: int
    floor: float
    """the framework's own float32 train-mode statistics against the float64 reference"""
    train_error: float
    eval_error: float
    passes: int
    converged: bool
    time_ratio: float
    eval_batch: int | None = None
    """the most samples one forward of eval mode's passes took"""
    eval_mib: float = np.nan
    """what eval mode's run added to the process's peak memory"""
    note: str = ""

    @property
    def ok(self) -> bool:
        bound = max(1e-4, 2 * self.floor)  # deep nets' float32 arithmetic alone can land further off
        return (self.found == self.true and self.train_error <= bound and self.eval_error <= bound and self.converged
                and self.passes <= PASSES)


def cli(*args) -> dict:
    """Run one bnrepair command in this process, as the shell would; its --json report, with ``grew_mib``: what
    the command added to the process's peak memory."""
    from typer.testing import CliRunner

    from bnrepair.cli import app

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        done = []
        _, grew = peak_rss_mib(lambda: done.append(CliRunner().invoke(app, [*map(str, args), "--json", str(report),
                                                                            "-q"])))
        if done[0].exit_code not in (0, 1):  # inspect exits 1 when it flags the broken statistics
            raise RuntimeError(f"bnrepair {args[0]} exited {done[0].exit_code}: {done[0].output.strip()}")
        return {**json.loads(report.read_text()), "grew_mib": grew}


def error(got: dict, want: dict, eps: dict) -> float:
    worst = 0.0
    for name, (mean, var) in want.items():
        scale = var + eps[name]
        worst = max(worst, float(np.max(np.abs(got[name][0] - mean) / np.sqrt(scale))),
                    float(np.max(np.abs(got[name][1] - var) / scale)))
    return worst


def fixed_point(one_pass, start: dict, tol: float = 1e-6, limit: int = 300) -> dict:
    """Iterate inference-mode passes from ``start`` until no statistic moves more than ``tol`` std."""
    current = start
    for _ in range(limit):
        new = one_pass(current)
        moved = max(float(np.max(np.abs(new[k][0] - current[k][0]) / np.sqrt(new[k][1] + 1e-12))) for k in new)
        current = new
        if moved < tol:
            break
    return current


def shuffled_batches(x: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The batches ``recalibrate --seed 0`` makes of an array (its documented seeded shuffle): train-mode
    statistics depend on which samples share a batch."""
    x = x[np.random.default_rng(0).permutation(len(x))]
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


class Pool:
    """float64 count / sum / sum of squares per channel (a different formula from bnrepair's Chan merge)."""

    def __init__(self):
        self.n, self.s, self.q = 0, 0.0, 0.0

    def add(self, x: np.ndarray, axis: int, valid: np.ndarray | None = None) -> None:
        """``valid``: (N, T) positions of a masked sequence to count, the others left out."""
        x = np.asarray(x, np.float64)
        if valid is not None:
            x = x[valid]
            axis = -1
        x = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
        self.n += len(x)
        self.s = self.s + x.sum(0)
        self.q = self.q + (x * x).sum(0)

    def stats(self, unbiased: bool) -> tuple[np.ndarray, np.ndarray]:
        mean = self.s / self.n
        m2 = self.q - self.n * mean * mean
        return mean, m2 / (self.n - 1 if unbiased else self.n)


# --- torch ---------------------------------------------------------------------------------------------------
def torch_bn(model) -> dict:
    import torch

    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "running_mean", None), torch.Tensor) and "InstanceNorm" not in type(m).__name__}


def torch_passes(model, batches: list[np.ndarray], dtype):
    """``one_pass(train, stats)``: every BN input's pooled moments, a copy of the model run in ``dtype``."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    twin = copy.deepcopy(model).to(dtype).eval()
    bns = torch_bn(twin)

    def one_pass(train: bool, stats: dict | None = None) -> dict:
        pools = {name: Pool() for name in bns}
        handles = []
        for name, m in bns.items():
            if stats is not None and name in stats:  # layers inference never reaches have none
                m.running_mean.copy_(torch.as_tensor(stats[name][0]))
                m.running_var.copy_(torch.as_tensor(stats[name][1]))
            m.training = train and isinstance(m, _BatchNorm)  # this module only: Dropout / drop-path stay off

            def hook(module, args, name=name):
                x = args[0].detach()
                pools[name].add(x.numpy(), 1)
                if train and not isinstance(module, _BatchNorm):  # frozen look-alikes: lend the batch's statistics
                    dims = (0, *range(2, x.dim()))
                    module.running_mean = x.mean(dims)
                    module.running_var = x.var(dims, unbiased=False)

            handles.append(m.register_forward_pre_hook(hook))
        with torch.no_grad():
            for x in batches:
                twin(torch.as_tensor(x).to(dtype))
        for h in handles:
            h.remove()
        return {name: p.stats(unbiased=True) for name, p in pools.items() if p.n}  # unreached: left alone

    return one_pass


def torch_reference(model, batches: list[np.ndarray]) -> tuple[dict, dict, dict]:
    """train and eval references in float64 (float32's own noise is not the reference), and torch's own
    float32 train-mode statistics: how far float32 arithmetic alone lands from the reference."""
    import torch

    one_pass = torch_passes(model, batches, torch.float64)
    train = one_pass(True)
    return train, fixed_point(lambda s: one_pass(False, s), train), torch_passes(model, batches, torch.float32)(True)


def torch_plain_seconds(model, batches) -> float:
    import torch

    with torch.inference_mode():
        model(torch.as_tensor(batches[0]))
        start = time.perf_counter()
        for x in batches:
            model(torch.as_tensor(x))
    return time.perf_counter() - start


def run_torch(name: str, folder: Path, samples: int, batch_size: int) -> Row:
    import torch

    model = zoo_models.torch_model(name)
    rng = np.random.default_rng(1)
    for m in torch_bn(model).values():  # broken on purpose: statistics of nothing this model computes
        m.running_mean.copy_(torch.as_tensor(rng.normal(0, 3, m.running_mean.shape)))
        m.running_var.copy_(torch.as_tensor(rng.uniform(0.01, 20, m.running_var.shape)))
    ckpt = folder / f"{name}.pt"
    state = model.state_dict()
    torch.save({"model": state, "epoch": 7} if len(name) % 2 else state, ckpt)  # both ways users save
    x = rng.normal(0, 1, (samples, *zoo_models.torch_input_shape(name))).astype(np.float32)
    np.save(folder / f"{name}.npy", x)
    batches = shuffled_batches(x, batch_size)
    arch = ["--arch", ARCH, "--arch-kwargs", json.dumps({"name": name})]
    inspected = cli("inspect", ckpt, *arch)
    train_ref, eval_ref, float32 = torch_reference(model, batches)
    eps = {n: float(getattr(m, "eps", 1e-5)) for n, m in torch_bn(model).items()}
    result, notes = {}, []
    for mode in ("train", "eval"):
        out = folder / f"{name}.{mode}.pt"
        try:
            report = cli("recalibrate", ckpt, *arch, "--data", folder / f"{name}.npy", "-o", out, "--mode", mode,
                         "--batch-size", batch_size, "--max-passes", MAX_PASSES)
        except RuntimeError as exc:
            result[mode] = FAILED, np.nan
            notes.append(f"{mode}: {exc}")
            continue
        written = torch.load(out, weights_only=True)
        written = written.get("model", written)
        got = {n: (written[f"{n}.running_mean"].double().numpy(), written[f"{n}.running_var"].double().numpy())
               for n in train_ref}
        result[mode] = (report, error(got, train_ref if mode == "train" else eval_ref, eps))
    plain = torch_plain_seconds(model, batches)
    return Row(name, len(inspected["layers"]), len(eps), error(float32, train_ref, eps), result["train"][1],
               result["eval"][1], result["eval"][0]["passes"], result["eval"][0]["converged"],
               result["train"][0]["seconds"] / plain, result["eval"][0]["eval_batch"], result["eval"][0]["grew_mib"],
               "; ".join(notes))


# --- Keras ---------------------------------------------------------------------------------------------------
def keras_passes(model, batches: list[np.ndarray]):
    """``one_pass(train, stats)``: every BN input's pooled moments, ``model`` run in its own dtype."""
    import keras

    bns = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
           if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0  # training=True below must switch BN to batch statistics, not Dropout on
    probe = keras.Model(model.inputs, [bn.input for bn in bns])

    def one_pass(train: bool, stats: dict | None = None) -> dict:
        if stats is not None:
            for bn in bns:
                bn.moving_mean.assign(stats[bn.name][0])
                bn.moving_variance.assign(stats[bn.name][1])
        pools = {bn.name: Pool() for bn in bns}
        for x in batches:
            for bn, value in zip(bns, probe(x.astype(model.dtype), training=train)):
                valid = None
                if isinstance(value, (list, tuple)):  # a masked call's input: the tensor and Keras's own mask
                    value, valid = value[0], keras.ops.convert_to_numpy(value[1])
                pools[bn.name].add(keras.ops.convert_to_numpy(value), bn.axis if isinstance(bn.axis, int)
                                   else bn.axis[0], valid)
        return {name: p.stats(unbiased=False) for name, p in pools.items()}

    return one_pass, {bn.name: bn.epsilon for bn in bns}


def keras_reference(name: str, loaded, batches: list[np.ndarray]) -> tuple[dict, dict, dict, dict]:
    """train and eval references from ``name`` rebuilt in float64 with ``loaded``'s weights (float32's own
    noise is not the reference), Keras's own float32 train-mode statistics, and each layer's epsilon."""
    import keras

    keras.config.set_dtype_policy("float64")
    try:
        model = zoo_models.keras_model(name)
    finally:
        keras.config.set_dtype_policy("float32")
    model.set_weights([np.asarray(w, np.float64) for w in loaded.get_weights()])
    one_pass, eps64 = keras_passes(model, batches)
    float32, eps = keras_passes(loaded, batches)
    train = one_pass(True)
    named = dict(zip(eps64, eps))  # BN layers in the same order; unnamed ones got other names in the rebuild

    def renamed(stats: dict) -> dict:
        return {named[k]: v for k, v in stats.items()}

    return renamed(train), renamed(fixed_point(lambda s: one_pass(False, s), train)), float32(True), eps


def written_stats(out: Path, savedmodel: bool) -> dict:
    """Each BN layer's (mean, variance) in a repaired file, read by Keras (or TensorFlow for a SavedModel)."""
    import keras

    if savedmodel:
        import tensorflow as tf

        values = {v.name: np.asarray(v.numpy(), np.float64) for v in tf.saved_model.load(str(out)).variables}
        return {name.rsplit("/", 1)[0]: (values[name], values[name.replace("moving_mean", "moving_variance")])
                for name in values if name.endswith("/moving_mean:0")}
    fixed = keras.models.load_model(out, compile=False)
    return {layer.name: (np.asarray(layer.moving_mean, np.float64), np.asarray(layer.moving_variance, np.float64))
            for layer in fixed._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)}


def run_keras(name: str, folder: Path, samples: int, batch_size: int) -> Row:
    """``<Application>_savedmodel``: the application exported with ``model.export`` and repaired as a SavedModel."""
    import keras

    savedmodel = name.endswith(SAVEDMODEL)
    base = name[:-len(SAVEDMODEL)] if savedmodel else name
    model = zoo_models.keras_model(base)
    rng = np.random.default_rng(1)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 3, layer.moving_mean.shape).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.01, 20, layer.moving_variance.shape).astype(np.float32))
    ckpt = folder / (name if savedmodel else f"{name}.h5" if name in LEGACY_H5 else f"{name}.keras")
    model.export(str(ckpt), verbose=False) if savedmodel else model.save(ckpt)
    x = rng.normal(0, 1, (samples, *zoo_models.keras_input_shape(base))).astype(np.float32)
    if name == "masked_sequence":
        for row, length in zip(x, rng.integers(3, x.shape[1], samples)):
            row[length:] = 0.0  # padding
    np.save(folder / f"{name}.npy", x)
    batches = shuffled_batches(x, batch_size)
    inspected = cli("inspect", ckpt)
    model.predict(x, batch_size=batch_size, verbose=0)  # warm: the trace is built once
    start = time.perf_counter()
    model.predict(x, batch_size=batch_size, verbose=0)
    plain = time.perf_counter() - start
    loaded = model if savedmodel else keras.models.load_model(ckpt, compile=False)
    train_ref, eval_ref, float32, eps = keras_reference(base, loaded, batches)
    result, notes = {}, []
    for mode in ("train", "eval"):
        out = folder / f"{name}.{mode}{ckpt.suffix}"
        try:
            report = cli("recalibrate", ckpt, "--data", folder / f"{name}.npy", "-o", out, "--mode", mode,
                         "--batch-size", batch_size, "--max-passes", MAX_PASSES)
        except RuntimeError as exc:
            result[mode] = FAILED, np.nan
            notes.append(f"{mode}: {exc}")
            continue
        result[mode] = (report, error(written_stats(out, savedmodel), train_ref if mode == "train" else eval_ref, eps))
    return Row(name, len(inspected["layers"]), len(train_ref), error(float32, train_ref, eps), result["train"][1],
               result["eval"][1], result["eval"][0]["passes"], result["eval"][0]["converged"],
               result["train"][0]["seconds"] / plain, result["eval"][0]["eval_batch"], result["eval"][0]["grew_mib"],
               "; ".join(notes))


# --- the table -----------------------------------------------------------------------------------------------
def available(framework: str) -> str | None:
    """Why ``framework``'s models cannot run here, or None."""
    import importlib.util

    needs = {"torch": ("torch", "torchvision", "timm"), "keras": ("tensorflow", "keras")}[framework]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    return f"{framework} models left out: {', '.join(missing)} not installed" if missing else None


def chosen(framework: str, only: list[str] | None):
    """(framework, model name) for each zoo model asked for whose framework is installed; a line for the rest."""
    for name, models in (("torch", zoo_models.TORCH_MODELS), ("keras", zoo_models.KERAS_MODELS)):
        if framework not in (name, "all"):
            continue
        reason = available(name)
        if reason:
            print(reason)
            continue
        yield from ((name, model) for model in models if not only or model in only)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=("torch", "keras", "all"), default="all")
    parser.add_argument("--only", nargs="*", help="model names (see zoo_models.py)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    rows = []
    print(f"{'model':28} {'BN found/true':>13} {'f32 floor':>10} {'train err':>10} {'eval err':>10} {'passes':>6} "
          f"{'eval batch':>10} {'eval MiB':>8} {'train/plain':>11}  ok", flush=True)
    for framework, name in chosen(args.framework, args.only):
        run = run_torch if framework == "torch" else run_keras
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = run(name, Path(tmp), args.samples, args.batch_size)
            except Exception as exc:  # a failure is a row of the table, not the end of the run
                note = f"{type(exc).__name__}: {exc}"[:200]
                row = Row(name, 0, 0, np.nan, np.nan, np.nan, 0, False, np.nan, note=note)
        rows.append(row)
        print(f"{row.model:28} {row.found:>6}/{row.true:<6} {row.floor:>10.2e} {row.train_error:>10.2e} "
              f"{row.eval_error:>10.2e} {row.passes:>6} {row.eval_batch or '-':>10} {row.eval_mib:>8.0f} "
              f"{row.time_ratio:>11.2f}  {'yes' if row.ok else 'NO'} "
              f"{row.note}", flush=True)
    print(f"{sum(r.ok for r in rows)} of {len(rows)} models within max(1e-4, 2 x float32 floor) std, "
          f"eval converged in <= {PASSES} passes")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
