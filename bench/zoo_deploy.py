"""Fold and export on the model zoo: every model of ``zoo_models`` through ``bnrepair fold``, ``export --fold``
and ``export --no-fold``, each verified by bnrepair itself against the source (layer by layer, then the
outputs in onnxruntime); this script adds what the written ONNX holds.

For each model: build it with random weights, give every BN layer random statistics and affine parameters
of a trained net's size (so a wrong fold cannot hide behind identity BN), save it as a user would, and run
the three commands on random inputs. The table gives BN layers, folded / refused with the reasons, the
BatchNormalization nodes left in the folded ONNX (must equal the refused count), the largest verified
difference of each command, float32's own error at the folded layers (the yardstick verification allows a
multiple of), and each command's time over one plain inference pass.

    python bench/zoo_deploy.py [--framework torch|keras|onnx|all] [--only NAME ...] [--samples 32]

Needs onnx and onnxruntime besides the zoo's own dependencies (see ``zoo.py``); the fold-only models
(``zoo_models.TORCH_FOLD_EXTRAS``, ``ONNX_MODELS``) need transformers and onnxscript too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import zoo  # noqa: E402
import zoo_models  # noqa: E402


def broken_torch(name: str):
    """The zoo model with random statistics and affine parameters of a trained net's size."""
    import torch

    model = zoo_models.torch_model(name)
    rng = np.random.default_rng(2)
    for m in zoo.torch_bn(model).values():
        m.running_mean.copy_(torch.as_tensor(rng.normal(0, 0.5, m.running_mean.shape)))
        m.running_var.copy_(torch.as_tensor(rng.uniform(0.5, 2.0, m.running_var.shape)))
        if getattr(m, "weight", None) is not None:
            with torch.no_grad():
                m.weight.copy_(torch.as_tensor(rng.uniform(0.5, 1.5, m.weight.shape)))
                m.bias.copy_(torch.as_tensor(rng.normal(0, 0.5, m.bias.shape)))
    return model


def inputs(name: str, folder: Path, samples: int) -> Path:
    x = np.random.default_rng(3).normal(0, 1, (samples, *zoo_models.torch_input_shape(name))).astype(np.float32)
    np.save(folder / "x.npy", x)
    return folder / "x.npy"


def saved_torch(name: str, folder: Path, samples: int) -> tuple[Path, list, Path, float]:
    """The checkpoint, its CLI arguments, the inputs and one plain inference pass's seconds."""
    import torch

    model = broken_torch(name)
    ckpt = folder / f"{name}.pt"
    torch.save(model.state_dict(), ckpt)
    data = inputs(name, folder, samples)
    plain = zoo.torch_plain_seconds(model, [np.load(data)])
    return ckpt, ["--arch", zoo.ARCH, "--arch-kwargs", json.dumps({"name": name})], data, plain


def saved_onnx(name: str, folder: Path, samples: int) -> tuple[Path, list, Path, float]:
    """A zoo model as ``name`` says a torch exporter writes it (``resnet18_dynamo18``: the dynamo exporter at
    opset 18, without its optimiser, which would fold the BN itself)."""
    import onnxruntime as ort
    import torch

    base, exporter = name.rsplit("_", 1)
    kind, opset = exporter[:-2], int(exporter[-2:])
    model, path = broken_torch(base), folder / f"{name}.onnx"
    example = torch.zeros(2, *zoo_models.torch_input_shape(base))
    if kind == "legacy":
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                          dynamic_axes={"input": {0: "b"}}, training=torch.onnx.TrainingMode.PRESERVE)
    else:
        torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, optimize=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},)).save(str(path))
    data = inputs(base, folder, samples)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.load(data)}
    session.run(None, feed)
    start = time.perf_counter()
    session.run(None, feed)
    return path, [], data, time.perf_counter() - start


def saved_keras(name: str, folder: Path, samples: int) -> tuple[Path, list, Path, float]:
    import keras

    savedmodel = name.endswith(zoo.SAVEDMODEL)
    base = name[:-len(zoo.SAVEDMODEL)] if savedmodel else name
    model = zoo_models.keras_model(base)
    rng = np.random.default_rng(2)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, c).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype(np.float32))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype(np.float32))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.5, c).astype(np.float32))
    ckpt = folder / (name if savedmodel else f"{name}.h5" if name in zoo.LEGACY_H5 else f"{name}.keras")
    model.export(str(ckpt), verbose=False) if savedmodel else model.save(ckpt)
    x = rng.normal(0, 1, (samples, *zoo_models.keras_input_shape(base))).astype(np.float32)
    np.save(folder / "x.npy", x)
    model.predict(x, verbose=0)
    start = time.perf_counter()
    model.predict(x, verbose=0)
    return ckpt, [], folder / "x.npy", time.perf_counter() - start


def worst(report: dict, stage: str, measure: str = "max_abs") -> float:
    """The largest difference of ``stage``'s outputs from the source's (``max_rel``: over the output's scale)."""
    return max((c[measure] for c in report["checks"] if c["stage"] == stage), default=float("nan"))


def run(name: str, framework: str, folder: Path, samples: int) -> dict:
    import onnx

    saved = {"torch": saved_torch, "keras": saved_keras, "onnx": saved_onnx}[framework]
    ckpt, extra, data, plain = saved(name, folder, samples)
    row = {"model": name, "notes": []}
    folded_suffix = ".pt2" if framework == "torch" else ckpt.suffix or ".keras"  # torch.export's program for torch
    for command, args in (("fold", ["fold", ckpt, *extra, "-o", folder / f"folded{folded_suffix}"]),
                          ("export --fold", ["export", ckpt, *extra, "-o", folder / "folded.onnx", "--fold"]),
                          ("export --no-fold", ["export", ckpt, *extra, "-o", folder / "plain.onnx", "--no-fold"])):
        try:
            report = zoo.cli(*args, "--data", data, "--samples", samples)
        except RuntimeError as exc:
            row[command] = None
            row["notes"].append(f"{command}: {exc}"[:160])
            continue
        row[command] = report
        row[f"{command} |Δ|"] = worst(report, "onnx" if command.startswith("export") else "fold")
        row[f"{command} rel"] = worst(report, "onnx" if command.startswith("export") else "fold", "max_rel")
        row[f"{command} time"] = report["seconds"] / plain
    folded = row.get("export --fold") or row.get("fold")
    if folded:
        row["bn"] = len(folded["folded"]) + len(folded["refused"])
        row["folded"] = len(folded["folded"])
        row["reasons"] = Counter(re.sub(r"(?<![\w(])[\w./]*\d[\w./]*", "<layer>", r["reason"].split(":")[0])[:70]
                                 for r in folded["refused"])  # grouped by what they say, not whom they name
        row["float32 noise"] = max((r["float32_noise"] for r in folded["folded"]), default=np.nan)
    if row.get("export --fold"):
        graph = onnx.load(folder / "folded.onnx").graph
        row["bn nodes left"] = sum(n.op_type == "BatchNormalization" for n in graph.node)
    return row


def chosen(framework: str, only: list[str] | None):
    """The zoo's models, then the fold-only ones: torch extras and ONNX graphs from torch's exporters (these need
    transformers and onnxscript besides the torch zoo's packages)."""
    if framework != "onnx":
        yield from zoo.chosen(framework, only)
    if zoo.available("torch") is None:
        for kind, names in (("torch", zoo_models.TORCH_FOLD_EXTRAS), ("onnx", zoo_models.ONNX_MODELS)):
            if framework in (kind, "all"):
                yield from ((kind, name) for name in names if not only or name in only)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=("torch", "keras", "onnx", "all"), default="all")
    parser.add_argument("--only", nargs="*", help="model names (see zoo_models.py)")
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args(argv)
    print(f"{'model':28} {'folded/BN':>10} {'ONNX BN':>7} {'fold |Δ|':>9} {'f32 noise':>9} {'x plain':>7} "
          f"{'onnx |Δ|':>9} {'onnx rel':>8} {'x plain':>7} {'no-fold |Δ|':>11}  refused because / failures", flush=True)
    good = total = 0
    for framework, name in chosen(args.framework, args.only):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                row = run(name, framework, Path(tmp), args.samples)
            except Exception as exc:  # a failure is a row of the table, not the end of the run
                row = {"model": name, "notes": [f"{type(exc).__name__}: {exc}"[:160]]}
        total += 1
        ok = all(row.get(c) for c in ("fold", "export --fold", "export --no-fold")) and \
            row.get("bn nodes left") == row["bn"] - row["folded"] and row["export --fold rel"] <= 1e-4
        good += ok
        refused = "; ".join(f"{n} x {why}" for why, n in row.get("reasons", {}).items())
        print(f"{name:28} {row.get('folded', '-'):>4}/{row.get('bn', '-'):<5} {row.get('bn nodes left', '-'):>7} "
              f"{row.get('fold |Δ|', np.nan):>9.1e} {row.get('float32 noise', np.nan):>9.1e} "
              f"{row.get('fold time', np.nan):>7.1f} "
              f"{row.get('export --fold |Δ|', np.nan):>9.1e} {row.get('export --fold rel', np.nan):>8.1e} "
              f"{row.get('export --fold time', np.nan):>7.1f} "
              f"{row.get('export --no-fold |Δ|', np.nan):>11.1e}  {refused} {' '.join(row['notes'])}", flush=True)
    print(f"{good} of {total} models fold, export folded and unfolded, and verify; the folded ONNX within 1e-4 of "
          "each output's scale")
    return 0 if good == total else 1


if __name__ == "__main__":
    sys.exit(main())
