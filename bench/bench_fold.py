"""What folding BN buys at inference: folded / unfolded time in onnxruntime and in the source framework.

One ResNet-style conv net per framework, the same architecture in Keras and torch (conv / BN / ReLU
stages with residual adds, global pooling, a dense head). Folded and unfolded are warmed up, then
timed alternately ``--repeats`` times over one batch, so load on a shared machine hits both alike;
the medians are printed with their ratio. onnxruntime fuses Conv+BN itself when it loads a model, so
its ratio is expected near 1. Prints figures; asserts nothing.

    python bench/bench_fold.py [--batch-size 32] [--size 64] [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import bnrepair
from bnrepair.frameworks.onnx_runtime import onnx_session


def median_seconds(unfolded, folded, repeats: int) -> tuple[float, float]:
    """Medians of both, timed alternately."""
    times: tuple[list, list] = ([], [])
    for i in range(repeats + 2):
        for fn, kept in zip((unfolded, folded), times):
            started = time.perf_counter()
            fn()
            if i >= 2:  # the first two calls warm up (traces, allocations)
                kept.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def keras_net(size: int):
    from bnrepair.frameworks.keras import import_keras

    keras, _ = import_keras()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    x = inputs = keras.Input((size, size, 3), name="image")
    for i, width in enumerate((32, 64, 64, 128)):
        x = layers.Conv2D(width, 3, strides=1 if i == 0 else 2, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
        y = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.Add()([x, layers.BatchNormalization()(y)]))
    outputs = layers.Dense(10)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def torch_net():
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList()
            channels = 3
            for i, width in enumerate((32, 64, 64, 128)):
                self.stages.append(nn.ModuleDict({
                    "down": nn.Sequential(nn.Conv2d(channels, width, 3, 1 if i == 0 else 2, 1, bias=False),
                                          nn.BatchNorm2d(width), nn.ReLU()),
                    "res": nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))}))
                channels = width
            self.head = nn.Linear(channels, 10)

        def forward(self, x):
            for stage in self.stages:
                x = stage["down"](x)
                x = torch.relu(x + stage["res"](x))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    return Net().eval()


def torch_call(model, x):
    import torch

    with torch.inference_mode():
        return model(torch.as_tensor(x))


def bench(name: str, model, x: np.ndarray, call, repeats: int, folder: Path) -> None:
    folded = bnrepair.fold(model, data=x, samples=len(x)).model
    times = {"framework": median_seconds(lambda: call(model, x), lambda: call(folded, x), repeats)}
    sessions = []
    for fold in (False, True):
        path = folder / f"{name}-{fold}.onnx"
        bnrepair.export(model, path, fold=fold, data=x, samples=len(x))
        sessions.append(onnx_session(path.read_bytes()))
    feed = {sessions[0].get_inputs()[0].name: x}
    times[f"onnxruntime ({sessions[0].get_providers()[0]})"] = median_seconds(
        lambda: sessions[0].run(None, feed), lambda: sessions[1].run(None, feed), repeats)
    for where, (unfolded, done) in times.items():
        print(f"{name:<6} {where:<38} unfolded {unfolded * 1e3:8.2f} ms   folded {done * 1e3:8.2f} ms   "
              f"folded/unfolded {done / unfolded:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        import torch

        torch.set_num_threads(args.threads)
        x = rng.random((args.batch_size, 3, args.size, args.size), dtype=np.float32)
        bench("torch", torch_net(), x, torch_call, args.repeats, Path(folder))
        keras = keras_net(args.size)
        bench("keras", keras, np.transpose(x, (0, 2, 3, 1)).copy(),
              lambda m, v: m.predict_on_batch(v), args.repeats, Path(folder))


if __name__ == "__main__":
    main()
