"""Recalibration overhead on a torch module: ours vs ``swa_utils.update_bn`` vs a plain ``eval()`` forward.

Same module, same batches (CPU tensors, as a DataLoader yields them), one process. Each repetition
times the three in rotating order; the ratios are of medians. Targets: ours / update_bn <= 1.05,
ours / eval forward <= 1.15. Printed only, never asserted. On CPU the process's CPU time is printed
too: on a machine shared with other work it is the steadier measure of our own overhead.

    python bench/bench_torch.py [--model small|resnet18] [--device cpu|cuda] [--batches 8] [--batch-size 64]
                                [--reps 5] [--threads N] [--amp bf16|fp16]

``--amp``: all three run under ``torch.autocast`` in that dtype (an in-memory module's recalibration runs
inside the caller's autocast, as ``--amp`` makes it for a checkpoint).

``--model resnet18``: torchvision's, random weights, at 64x64 (needs torchvision, see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

import bnrepair


def block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def model() -> nn.Module:
    """A small VGG/ResNet-style CNN for 32x32 images: 6 conv + BN stages, Dropout and a BN1d head."""
    return nn.Sequential(block(3, 32, 1), block(32, 64, 2), block(64, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("small", "resnet18"), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's own]")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net, side = (model(), 32) if args.model == "small" else (resnet18(), 64)
    net = net.to(device)
    loader = [(torch.rand(args.batch_size, 3, side, side), torch.zeros(args.batch_size, dtype=torch.long))
              for _ in range(args.batches)]

    def ours():
        bnrepair.recalibrate(net, loader)

    def update_bn():
        torch.optim.swa_utils.update_bn(loader, net, device=device)

    def eval_forward():
        net.eval()
        with torch.inference_mode():
            for x, _ in loader:
                net(x.to(device))

    runs = {"ours": ours, "update_bn": update_bn, "eval forward": eval_forward}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast():
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    clocks = {"wall": time.perf_counter} | ({"cpu": time.process_time} if device.type == "cpu" else {})
    times = {(clock, name): [] for clock in clocks for name in runs}
    for fn in runs.values():  # warm-up: allocator, kernels, lazy imports
        with autocast():
            fn()
    names = list(runs)
    for rep in range(args.reps):
        for name in names[rep % 3:] + names[:rep % 3]:
            sync(device)
            start = {clock: read() for clock, read in clocks.items()}
            with autocast():
                runs[name]()
            sync(device)
            for clock, read in clocks.items():
                times[(clock, name)].append(read() - start[clock])
    median = {key: statistics.median(t) for key, t in times.items()}
    samples = args.batches * args.batch_size
    autocasting = f", autocast {args.amp}" if dtype else ""
    print(f"{args.model}, device {device}{autocasting}, {samples} samples in {args.batches} batches of "
          f"{args.batch_size}, "
          f"{args.reps} repetitions, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for clock in clocks:
        print(f"{clock} time, median: " + ", ".join(f"{name} {median[(clock, name)] * 1e3:.0f} ms" for name in runs))
        print(f"  ours / update_bn:    {median[(clock, 'ours')] / median[(clock, 'update_bn')]:.3f}   (target <= 1.05)")
        print(f"  ours / eval forward: {median[(clock, 'ours')] / median[(clock, 'eval forward')]:.3f}   "
              "(target <= 1.10 CPU)")
    per_call(net, loader, eval_forward, autocast, clocks["cpu" if "cpu" in clocks else "wall"], device)


def per_call(net, loader, eval_forward, autocast, clock, device) -> None:
    """Calls 1, 2 and 10 on a fresh copy of the module, as a training script calls ``update_bn`` once an epoch:
    each call's time over an eval forward's, in train and eval mode. Nothing built for the module (fx's call
    counts, TorchScript captures) may be built again on the second call."""
    import copy

    def timed(fn) -> float:
        sync(device)
        start = clock()
        with autocast():
            fn()
        sync(device)
        return clock() - start

    for mode in ("train", "eval"):
        fresh = copy.deepcopy(net)
        ratios = {}
        for call in range(1, 11):
            floor = timed(eval_forward)
            took = timed(lambda: bnrepair.recalibrate(fresh, loader, mode=mode, eval_batch_size=len(loader[0][0])))
            ratios[call] = took / floor
        print(f"  per call, {mode} mode: call 1 {ratios[1]:.2f}, call 2 {ratios[2]:.2f}, call 10 {ratios[10]:.2f} "
              "(x an eval forward)")


if __name__ == "__main__":
    main()
