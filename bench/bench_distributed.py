"""Recalibration across processes: 1 vs N ranks of ``torchrun -m bnrepair recalibrate`` on the same data.

One checkpoint (bench_torch's small CNN, random weights, as a state_dict) and one ``.npy`` calibration set,
written to a temporary folder; then, in rotating order, ``--reps`` runs of torchrun with each rank count.
Printed per rank count: the median wall time of the whole command (start-up, model load, process group
included) and of the recalibration itself (the report's ``seconds``, rank 0), the speed-up over one rank
and the scaling efficiency ``T1 / (N * TN)`` (target >= 0.9 per added GPU); and the largest difference of
the written statistics from the one-rank run (the ranks merge exactly: float32 rounding only).

Every rank gets ``--threads`` torch threads (default 1; torchrun itself sets one thread per rank only when it
starts several), so on the CPU this measures what N processes of one thread each give over one such process.

    python bench/bench_distributed.py [--ranks 1 2] [--samples 4096] [--size 64] [--batch-size 64]
                                      [--reps 3] [--device cpu|cuda] [--mode train|eval] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_torch import model  # noqa: E402

HERE = Path(__file__).resolve().parent


def run(ranks: int, checkpoint: Path, data: Path, out: Path, args) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    report = out.with_suffix(".json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
               "bnrepair", "recalibrate", str(checkpoint), "--arch", f"{HERE / 'bench_torch.py'}:model", "--data",
               str(data), "-b", str(args.batch_size), "--mode", args.mode, "--device", args.device, "-o", str(out),
               "--json", str(report), "-q"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 3):
        sys.exit(f"{ranks} rank(s) failed:\n{done.stderr[-2000:]}")
    return wall, json.loads(report.read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default="train")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        torch.save(model().state_dict(), tmp / "model.pt")
        rng = np.random.default_rng(0)
        np.save(tmp / "calib.npy", rng.normal(0.5, 0.25, (args.samples, 3, args.size, args.size)).astype(np.float32))
        times: dict[int, list[tuple[float, float]]] = {n: [] for n in args.ranks}
        for rep in range(args.reps):
            for n in args.ranks[rep % len(args.ranks):] + args.ranks[:rep % len(args.ranks)]:  # rotating order
                times[n].append(run(n, tmp / "model.pt", tmp / "calib.npy", tmp / f"out{n}.pt", args))
        base = torch.load(tmp / f"out{args.ranks[0]}.pt")
        print(f"{args.samples} samples {args.size}x{args.size}, batch {args.batch_size}, {args.mode} mode, "
              f"{args.device}, {args.reps} runs each (medians)")
        print(f"{'ranks':>5} {'wall s':>8} {'recal s':>8} {'speed-up':>9} {'efficiency':>10} {'max |diff|':>11}")
        one = statistics.median(r for _, r in times[args.ranks[0]]) * args.ranks[0]
        for n in args.ranks:
            wall, recal = (statistics.median(t[i] for t in times[n]) for i in (0, 1))
            state = torch.load(tmp / f"out{n}.pt")
            diff = max(float((state[k].double() - base[k].double()).abs().max()) for k in base if "running_" in k)
            print(f"{n:>5} {wall:>8.2f} {recal:>8.2f} {one / recal:>9.2f} {one / (n * recal):>10.2f} {diff:>11.2e}")


if __name__ == "__main__":
    main()
