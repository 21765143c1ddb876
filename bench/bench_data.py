"""Whether the calibration stream keeps a model fed: decoding throughput, and recalibration next to a plain
inference pass with the loaders users already have. Prints ratios measured side by side; asserts nothing.

A generated folder of JPEGs (``--images`` of 480x360, 4 class folders) resized to 224x224:
(a) decode only, images/s: bnrepair's stream vs a torch ``DataLoader`` (same workers, Pillow decode and the
    same resize), each warmed up once then timed ``--repeats`` times alternating (median), vs
    ``keras.utils.image_dataset_from_directory`` (tf.data);
(b) torch: ``recalibrate --mode train`` wall time / a plain pass of the same model in ``eval()`` fed by that
    DataLoader (target <= 1.15);
(c) ``recalibrate --mode eval`` wall time / the plain pass, with the decoded-sample cache and without
    (target with it: <= passes + 0.3);
(e) Keras: ``recalibrate --mode train`` wall time / ``model.predict`` on the same folder through
    ``image_dataset_from_directory`` (tf.data, scaled to [0, 1]), a small conv / BN net at 224 x 224, both
    warmed up, alternating, medians (target <= 1.3);
(d) peak memory (max RSS of a fresh process) of ``recalibrate --mode eval --cache-mb 0`` on folders of 1k and
    10k small PNGs: 10k / 1k (target <= 1.05: the stream holds a few batches, whatever the folder's size).

    python bench/bench_data.py [--images 600] [--workers N] [--memory-images 1000 10000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bnrepair  # noqa: E402
from bnrepair.data import Calibration, ImageFolder, ImageSpec  # noqa: E402
from bnrepair.data.stream import usable_cpus  # noqa: E402

SIZE = (224, 224)


def write_folder(root: Path, count: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        base = Image.fromarray(rng.integers(0, 255, (45, 60, 3), dtype=np.uint8)).resize((480, 360), Image.BICUBIC)
        noisy = np.asarray(base).astype(np.int16) + rng.integers(-20, 20, (360, 480, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torch_loader(root: Path, workers: int):
    import torch
    from PIL import Image

    files = sorted(root.rglob("*.jpg"))

    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            with Image.open(files[i]) as im:
                x = np.asarray(im.convert("RGB").resize(SIZE[::-1], Image.BILINEAR), np.float32) / 255.0
            return torch.from_numpy(x.transpose(2, 0, 1).copy())

    return torch.utils.data.DataLoader(Folder(), batch_size=32, num_workers=workers, shuffle=False)


PEAK = """
import resource, sys
from pathlib import Path
import torch
import bnrepair
from fixtures.torch.arch import build
folder, arch, tmp = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
torch.manual_seed(0)
torch.save(build().state_dict(), tmp / "m.pt")
bnrepair.recalibrate(tmp / "m.pt", folder, output=tmp / "r.pt", arch=arch, mode="eval", cache_mb=0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_kb(count: int, tmp: Path, arch: str) -> int:
    """Max RSS (KiB) of a fresh process recalibrating on ``count`` 32x32 PNGs, the cache off."""
    from PIL import Image

    folder = tmp / f"png{count}"
    rng = np.random.default_rng(count)
    for i in range(count):
        (folder / f"class{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"class{i % 4}" / f"{i}.png")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", PEAK, str(folder), arch, str(tmp)], capture_output=True, text=True,
                          check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    return int(done.stdout.split()[-1])


def keras_line(root: Path, tmp: Path, workers: int, repeats: int) -> None:
    try:
        import keras
    except ImportError:
        print("(e) Keras not installed", flush=True)
        return
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((*SIZE, 3))
    for filters in (16, 32):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x)))
    model.save(tmp / "k.keras")
    dataset = keras.utils.image_dataset_from_directory(root, image_size=SIZE, batch_size=32, shuffle=False,
                                                       verbose=False).map(lambda images, _: images / 255.0)
    model.predict(dataset, verbose=0)  # warm: traces, the page cache
    bnrepair.recalibrate(tmp / "k.keras", root, output=tmp / "r.keras", workers=workers)
    runs = [(timed(lambda: model.predict(dataset, verbose=0)),
             timed(lambda: bnrepair.recalibrate(tmp / "k.keras", root, output=tmp / "r.keras", workers=workers)))
            for _ in range(repeats)]
    plain, ours = (statistics.median(r[k] for r in runs) for k in (0, 1))
    print(f"(e) Keras recalibrate --mode train {ours:.2f}s / tf.data + predict {plain:.2f}s = {ours / plain:.2f} "
          "(target <= 1.3)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, default=usable_cpus())
    parser.add_argument("--memory-images", type=int, nargs=2, default=(1000, 10000))
    parser.add_argument("--repeats", type=int, default=3, help="(a), (e): timed runs of each, alternating (median)")
    args = parser.parse_args(argv)
    import torch

    from fixtures.torch.arch import build

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "jpegs"
        write_folder(root, args.images)
        loader = torch_loader(root, args.workers)

        def ours_pass():
            return [b for b in Calibration(ImageFolder(root, ImageSpec(size=SIZE)), workers=args.workers)]

        ours_pass(), [b for b in loader]  # warm-up: plugin imports, worker start, the page cache
        runs = [(timed(ours_pass), timed(lambda: [b for b in loader])) for _ in range(args.repeats)]
        ours, theirs = (statistics.median(r[k] for r in runs) for k in (0, 1))
        line = (f"(a) decode, {args.images} JPEGs 480x360 -> 224, {args.workers} workers: bnrepair "
                f"{args.images / ours:.0f} img/s, torch DataLoader {args.images / theirs:.0f} img/s "
                f"(ratio {theirs / ours:.2f})")
        try:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            import keras

            dataset = keras.utils.image_dataset_from_directory(root, image_size=SIZE, batch_size=32, shuffle=False,
                                                               verbose=False)
            tfdata = timed(lambda: [b for b in dataset])
            line += f", tf.data {args.images / tfdata:.0f} img/s"
        except ImportError:
            line += ", tf.data not installed"
        print(line, flush=True)

        torch.manual_seed(0)
        model = build().eval()
        torch.save(model.state_dict(), Path(tmp) / "m.pt")
        arch = str(Path(__file__).resolve().parent.parent / "fixtures" / "torch" / "arch.py") + ":build"

        def plain():
            with torch.inference_mode():
                for x in loader:
                    model(x)

        plain()  # warm
        inference = timed(plain)
        train = timed(lambda: bnrepair.recalibrate(Path(tmp) / "m.pt", root, output=Path(tmp) / "r.pt",
                                                    arch=arch, image_size=SIZE, workers=args.workers))
        print(f"(b) torch recalibrate --mode train {train:.2f}s / DataLoader + eval() pass {inference:.2f}s = "
              f"{train / inference:.2f} (target <= 1.15)", flush=True)
        for cache in (None, 0):
            report = None

            def evaluate():
                nonlocal report
                report = bnrepair.recalibrate(Path(tmp) / "m.pt", root, output=Path(tmp) / "r.pt", arch=arch,
                                              image_size=SIZE, workers=args.workers, mode="eval", cache_mb=cache)

            seconds = timed(evaluate)
            print(f"(c) --mode eval, cache {'on' if cache is None else 'off'}: {seconds:.2f}s = "
                  f"{seconds / inference:.2f} plain passes for {report.passes} passes "
                  f"(target with the cache: <= {report.passes + 0.3:.1f})", flush=True)
        keras_line(root, Path(tmp), args.workers, args.repeats)
        small, large = (peak_kb(n, Path(tmp), arch) for n in args.memory_images)
        print(f"(d) peak memory, --mode eval --cache-mb 0: {args.memory_images[0]} images {small / 1024:.0f} MiB, "
              f"{args.memory_images[1]} images {large / 1024:.0f} MiB: ratio {large / small:.3f} (target <= 1.05)",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
