"""A DDP training script's use of the API, run by ``test_distributed.py`` under torchrun (not a test itself).

Every rank builds the same model, wraps it in DDP and recalibrates it with its own part of one data set
(rank 0 the first ``SPLIT`` samples, rank 1 the rest, uneven on purpose), then saves the statistics it
ends with to ``OUT/rank<r>.npz``. Usage: ``torchrun --nproc-per-node 2 ddp_script.py OUT MODE``.
"""

import gc
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnrepair

SPLIT, SAMPLES, BATCH = 30, 50, 8


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    for bn in (net[1], net[4]):  # broken statistics, as a short run at high decay leaves them
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(0.01)
    return net


def data() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).normal(1.0, 2.0, (SAMPLES, 3, 12, 12)).astype(np.float32))


def main(out: Path, mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x = data()
    mine = x[:SPLIT] if rank == 0 else x[SPLIT:]
    loader = DataLoader(TensorDataset(mine), batch_size=BATCH)
    net = nn.parallel.DistributedDataParallel(model())
    report = bnrepair.recalibrate(net, loader, mode=mode)
    stats = {f"{name}.{kind}": getattr(m, f"running_{kind}").double().numpy()
             for name, m in net.module.named_modules() if isinstance(m, nn.BatchNorm2d) for kind in ("mean", "var")}
    np.savez(out / f"rank{rank}.npz", samples=report.samples, world_size=report.world_size, **stats)
    dist.barrier()  # every rank done before any leaves: gloo aborts a rank whose peer tore down mid-exchange
    del net
    gc.collect()  # DDP's reducer lives in reference cycles: freed after the group it uses, it aborts the process
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
