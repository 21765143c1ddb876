"""What recalibrating a Keras model costs, next to what using it costs. Prints ratios; asserts nothing.

(a) time: ``train``-mode recalibration of N in-memory samples (data stream, moments, set_stats) /
    ``model.predict`` over the same samples at the same batch size, on the CPU. Everything is warmed
    up first (traces built), then timed in turn; the ratio is of the medians. Target: <= 1.3, i.e.
    recalibrating costs about one inference pass. For reference, also the ratio to a bare traced
    forward pass per batch (no Keras predict loop): the compute floor.
(b) memory: peak RSS while streaming a folder of 1k and one of 10k PNG images (written to a temporary
    directory). Target: flat, because images are decoded lazily a few batches ahead and only
    per-channel moments are kept; what grows is the list of file names. Linux only (/proc/self).

(c) per-call cost: ``bnrepair.recalibrate(model, x)`` on the same in-memory MobileNetV2 ten times; the first
    call traces, the later ones reuse what it built (kept on the model). Target: <= 1.3 from the second call.

    python bench/bench_keras.py [--samples 1024] [--repeats 5] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # (a) and (b) are CPU figures

import numpy as np

import bnrepair
from bnrepair.frameworks.tf_runtime import import_keras

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memory import peak_rss_mib  # noqa: E402

from fixtures import synthetic  # noqa: E402

keras, tf = import_keras()


def small_cnn() -> keras.Model:
    """Fixture-sized: per-batch overhead dominates its cost."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((synthetic.SIZE, synthetic.SIZE, 3))
    x = inputs
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
        x = keras.layers.MaxPooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x)), name="small_cnn")


def mobilenet(alpha: float = 0.35) -> keras.Model:
    """52 BN layers behind cheap depthwise convolutions: BN is a large share of the work."""
    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=alpha, weights=None, classes=4)


MODELS = {"small_cnn (3 BN, 32x32)": small_cnn, "MobileNetV2-0.35 (52 BN, 96x96)": mobilenet,
          "MobileNetV2-1.0 (52 BN, 96x96)": lambda: mobilenet(1.0)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_model(model: keras.Model, samples: int, repeats: int, batch_size: int) -> tuple[float, float, float]:
    """Median seconds of (recalibration, model.predict, bare traced forward) over the same samples."""
    x = np.random.default_rng(0).random((samples, *model.input_shape[1:]), np.float32)
    runner = bnrepair.load(model, device="cpu")
    forward = tf.function(lambda t: model(t, training=False))

    def recalibrate():
        bnrepair.recalibrate(runner, x, batch_size=batch_size, mode="train")

    def predict():
        model.predict(x, batch_size=batch_size, verbose=0)

    def bare_forward():  # the compute floor: one traced inference call per batch, no Keras loop
        for start in range(0, len(x), batch_size):
            forward(x[start:start + batch_size]).numpy()

    fns = (recalibrate, predict, bare_forward)
    for fn in fns:  # warm-up: traces and first-call set-up
        fn()
    runs = [[timed(fn) for fn in fns] for _ in range(repeats)]
    return tuple(statistics.median(t) for t in zip(*runs))


def bench_time(samples: int, repeats: int, batch_size: int) -> None:
    print(f"(a) recalibration / model.predict, {samples} samples, batch {batch_size}, mode train, CPU; "
          f"median of {repeats} (target <= 1.3)")
    for name, build in MODELS.items():
        recal, pred, bare = time_model(build(), samples, repeats, batch_size)
        print(f"    {name:<34} recalibrate {recal:6.3f}s   predict {pred:6.3f}s   ratio {recal / pred:5.2f}   "
              f"(bare traced forward {bare:6.3f}s, ratio {recal / bare:5.2f})")


def bench_calls(samples: int, batch_size: int) -> None:
    """(c) the API called on the model itself, as update_bn is once per epoch: calls 1, 2 and 10, each over a
    warm bare traced forward pass on the same samples (measured just before it)."""
    print(f"(c) bnrepair.recalibrate(model, x) on the in-memory model, calls 1 / 2 / 10 over a bare traced forward, "
          f"{samples} samples, batch {batch_size} (target: <= 1.3 from the second call)")
    for name, build, side in (("MobileNetV2-1.0, 128x128", lambda: keras.applications.MobileNetV2(
            input_shape=(128, 128, 3), weights=None), 128), ("MobileNetV2-1.0, 64x64", lambda: keras.applications
                                                         .MobileNetV2(input_shape=(64, 64, 3), weights=None), 64)):
        model = build()
        x = np.random.default_rng(0).random((samples, side, side, 3), np.float32)
        forward = tf.function(lambda t, model=model: model(t, training=False))

        def bare():
            for start in range(0, len(x), batch_size):
                forward(x[start:start + batch_size]).numpy()

        bare()
        ratios = {}
        for call in range(1, 11):
            floor = timed(bare)
            ratios[call] = timed(lambda: bnrepair.recalibrate(model, x, batch_size=batch_size)) / floor
        print(f"    {name:<26} call 1 {ratios[1]:5.2f}   call 2 {ratios[2]:5.2f}   call 10 {ratios[10]:5.2f}")


def bench_memory(batch_size: int) -> None:
    sizes = (1000, 10000)
    runner = bnrepair.load(small_cnn(), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = synthetic.make_images(max(sizes), "a", seed=7)
        decoded_mib = images[0].size * 4 / 2**20  # float32 after --preprocess unit
        folders = {n: Path(tmp) / str(n) for n in sizes}
        for n, folder in folders.items():
            synthetic.write_folder(folder, images[:n], labels[:n])
        del images
        bnrepair.recalibrate(runner, folders[sizes[0]], batch_size=batch_size, samples=64)  # warm-up
        peaks = {n: peak_rss_mib(lambda n=n: bnrepair.recalibrate(runner, folders[n], batch_size=batch_size))
                 for n in sizes}
    print(f"(b) peak RSS streaming PNG images from a folder, batch {batch_size} (target: flat)")
    for n, (peak, growth) in peaks.items():
        print(f"    {n:>6} images   peak {peak:7.1f} MiB   growth {growth:5.1f} MiB   "
              f"(the decoded images alone: {n * decoded_mib:6.1f} MiB)")
    print(f"    ratio of peaks 10k / 1k: {peaks[sizes[1]][0] / peaks[sizes[0]][0]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    bench_time(args.samples, args.repeats, args.batch_size)
    bench_calls(512, args.batch_size)
    bench_memory(args.batch_size)


if __name__ == "__main__":
    main()
