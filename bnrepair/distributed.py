"""Recalibration across processes with ``torch.distributed``: batches shared out, moments merged exactly.

Train mode normalises each batch with its own statistics, so what a batch contributes does not depend on which
process measures it. Given one data set (``--data``, the same path on every rank), rank ``r`` of ``N`` takes
batches ``r, r + N, ...`` of the seeded sequence a single process would make: no sample read twice, none
skipped. After each pass every rank all-gathers every rank's per-layer ``(count, mean, M2)`` and merges them in
rank order with the same float64 Chan merge (``moments``): the same numbers merged in the same order, so every
rank ends with bit-identical statistics and makes the same decisions (converged, overflow, next pass).

Failures: every exchange starts with a header saying whether the rank failed and why. A rank whose work raises
(``Group.together``) sends that header in place of its next exchange, so every rank stops with that rank's error
instead of waiting for it. A rank that never answers (hung, killed) is named by ``monitored_barrier`` after the
timeout; it needs gloo, so an NCCL group gets a gloo group beside it for the headers. (A subgroup a training
script passes in over NCCL is used as it is: its own timeout applies and names no rank.)
"""

from __future__ import annotations

import functools
import os
import re
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np

from .errors import BnrepairError, first_line
from .moments import Moments

DEFAULT_TIMEOUT = 1800.0
"""seconds a rank waits for the others at an exchange: they may still be finishing a longer share of a pass"""
JOIN_TIMEOUT = 600.0
"""seconds the ranks wait for each other to start, at least"""
MESSAGE_BYTES = 1024
"""room for a failing rank's one-line error in the header"""


class RankFailed(BnrepairError):
    """Another rank's error, which every rank then exits with (exit 2, like the error itself) and rank 0 alone
    prints, so it is said once (``said_by_rank_0`` on the other ranks)."""


class NoAnswer(BnrepairError):
    """A rank did not reach an exchange within the timeout."""

    exit_code = 4


def launched() -> bool:
    """Whether this process is one of several that torchrun (or another launcher using its variables) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclass
class Group:
    """The processes recalibrating one model together; ``rank`` 0 writes."""

    group: Any
    """the torch ProcessGroup the moments go through (None: the default group)"""
    control: Any
    """a gloo group for the headers (None: ``group`` itself)"""
    rank: int
    size: int
    device: Any
    """where the exchanged tensors live: the rank's GPU for NCCL, else the CPU"""
    timeout: float
    owned: bool = False
    """joined here (the CLI under torchrun): left again by ``close``"""

    @classmethod
    def join(cls, timeout: float = DEFAULT_TIMEOUT) -> "Group":
        """The CLI under torchrun: join the default group from the environment (NCCL when every rank has a GPU,
        else gloo)."""
        import torch
        import torch.distributed as dist

        if not timeout > 0:
            raise BnrepairError(f"--dist-timeout must be a positive number of seconds, got {timeout:g}")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        gpu = torch.cuda.is_available() and dist.is_nccl_available() and local < torch.cuda.device_count()
        if gpu:
            torch.cuda.set_device(local)  # the runner's device "auto" is then this rank's GPU
        try:
            # joining waits for every rank to start (model loads, imports): not what --dist-timeout bounds
            dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(seconds=max(timeout, JOIN_TIMEOUT)))
        except (RuntimeError, ValueError) as exc:
            raise BnrepairError(f"joining the torchrun process group failed: {first_line(exc)}") from None
        group = cls.of(None, timeout)
        group.owned = True
        return group

    @classmethod
    def of(cls, process_group, timeout: float = DEFAULT_TIMEOUT) -> "Group":
        import torch
        import torch.distributed as dist

        nccl = dist.get_backend(process_group) == "nccl"
        control = None
        if nccl and process_group is None:  # the default group: every rank is here, so a gloo twin can be made
            control = _gloo_twin(timeout)
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(process_group, control, dist.get_rank(process_group), dist.get_world_size(process_group),
                   device, timeout)

    @classmethod
    def current(cls, process_group=None) -> "Group | None":
        """The API inside a training script: ``process_group`` None takes the default group where one is
        initialized with more than one rank, False opts out, a ProcessGroup (or a ``Group``) is used as given."""
        if isinstance(process_group, Group):
            return process_group
        if process_group is False or "torch" not in sys.modules:  # no group exists before torch is imported
            return None
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            if process_group is not None:
                raise BnrepairError("process_group given, but torch.distributed is not initialized")
            return None
        group = cls.of(process_group)
        return group if group.size > 1 else None

    def close(self, everyone_here: bool = True) -> None:
        """Leave a group joined here. Where every rank got this far (success, or an error all of them share),
        they wait for each other first: gloo aborts a rank whose peer tore down in the middle of the last
        exchange ("terminate called without an active exception")."""
        global _GLOO_TWIN
        if self.owned:
            import torch.distributed as dist

            if everyone_here:
                dist.barrier(self.control)
            _GLOO_TWIN = None  # it goes with the default group
            dist.destroy_process_group()

    def exchange(self, payload: np.ndarray | None = None, failure: str | None = None) -> list[np.ndarray]:
        """Every rank's ``payload`` (float64, any length), in rank order; raises on every rank when one failed."""
        import torch
        import torch.distributed as dist

        control = self.control if self.control is not None else self.group
        if dist.get_backend(control) == "gloo":
            try:
                dist.monitored_barrier(control, timeout=timedelta(seconds=self.timeout), wait_all_ranks=True)
            except RuntimeError as exc:
                raise NoAnswer(self._no_answer(exc)) from None
        payload = np.zeros(0) if payload is None else np.asarray(payload, np.float64).ravel()
        text = (failure or "").encode("utf-8", "replace")[:MESSAGE_BYTES]
        header = np.zeros(2 + MESSAGE_BYTES, np.int64)
        header[:2] = failure is not None, payload.size
        header[2:2 + len(text)] = np.frombuffer(text, np.uint8)
        headers = self._gathered(torch.from_numpy(header), control)
        for rank, h in enumerate(headers):
            if h[0]:
                message = bytes(h[2:].astype(np.uint8)).rstrip(b"\0").decode("utf-8", "replace")
                failed = RankFailed(message if rank == self.rank else f"rank {rank}: {message}")
                failed.said_by_rank_0 = self.rank != 0
                raise failed
        longest = int(max(h[1] for h in headers))
        padded = np.zeros(longest)
        padded[:payload.size] = payload
        values = self._gathered(torch.from_numpy(padded), self.group)
        return [v[:int(h[1])] for v, h in zip(values, headers)]

    def _gathered(self, tensor, group) -> list[np.ndarray]:
        import torch
        import torch.distributed as dist

        tensor = tensor.to("cpu" if dist.get_backend(group) == "gloo" else self.device)
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=group)
        return [p.cpu().numpy() for p in parts]

    def _no_answer(self, exc: RuntimeError) -> str:
        text = str(exc)
        found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        who = f"rank(s) {found.group(1).strip()}" if found else f"another rank ({first_line(exc)})"
        return (f"{who} did not answer rank {self.rank} within {self.timeout:g} s (--dist-timeout): hung, killed, "
                "or still working on a much longer share of the data")

    @contextmanager
    def together(self) -> Iterator[None]:
        """Work that may fail on one rank: its error is sent to the others at their next exchange, then raised."""
        try:
            yield
        except (RankFailed, NoAnswer):
            raise
        except Exception as exc:
            if getattr(exc, "told_the_ranks", False):  # an inner ``together`` did
                raise
            exc.told_the_ranks = True
            message = str(exc) if isinstance(exc, BnrepairError) else f"{type(exc).__name__}: {first_line(exc)}"
            try:
                self.exchange(failure=message)
            except RankFailed:  # every rank has it now: rank 0 says it, naming the rank
                exc.said_by_rank_0 = self.rank != 0
            except NoAnswer:
                pass
            raise

    def merged(self, totals: dict[str, Moments], ids: list[str], samples: int) -> tuple[dict[str, Moments], int]:
        """Every rank's moments of the layers ``ids`` merged in rank order (the same result on every rank), and
        the samples of all ranks. A layer travels as count, width, mean[width], m2[width]: a rank that never saw
        it sends width 0."""
        payload = [[samples]]
        for i in ids:
            m = totals[i]
            mean, m2 = (np.ravel(m.mean), np.ravel(m.m2)) if m.count else (np.zeros(0), np.zeros(0))
            payload += [[m.count, mean.size], mean, m2]
        merged, everyone = {i: Moments(0, np.zeros(()), np.zeros(())) for i in ids}, 0
        for values in self.exchange(np.concatenate(payload)):
            everyone += int(values[0])
            at = 1
            for i in ids:
                count, width = int(values[at]), int(values[at + 1])
                mean, m2 = values[at + 2:at + 2 + width], values[at + 2 + width:at + 2 + 2 * width]
                at += 2 + 2 * width
                if count:
                    merged[i] = merged[i].merge(Moments.of(count, mean, m2))
        return merged, everyone

    def gathered(self, values: np.ndarray) -> np.ndarray:
        """Every rank's ``values`` (rows), concatenated in rank order."""
        values = np.asarray(values, np.float64)
        rows = self.exchange(np.concatenate([[values.ndim], values.shape, values.ravel()]))
        parts = [r[1 + int(r[0]):].reshape(r[1:1 + int(r[0])].astype(int)) for r in rows]
        return np.concatenate([p for p in parts if p.size] or parts[:1])  # a rank with no rows may differ in shape

    def largest(self, value: float) -> float:
        return float(self.gathered(np.array([value])).max())

    def every(self, flag: bool) -> bool:
        return bool(self.gathered(np.array([float(flag)])).min())


def _gloo_twin(timeout: float):
    """The gloo group beside an NCCL default group, made once (every rank must take part in making it)."""
    global _GLOO_TWIN
    import torch.distributed as dist

    if _GLOO_TWIN is None:
        _GLOO_TWIN = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    return _GLOO_TWIN


_GLOO_TWIN = None


def across_ranks(function):
    """``function(..., process_group=...)`` as one rank of that group (``Group.current``): it gets the resolved
    ``Group`` (False for none) and its failure is told to the other ranks."""
    @functools.wraps(function)
    def wrapper(*args, process_group=None, **kwargs):
        group = Group.current(process_group)
        with together(group):
            return function(*args, process_group=False if group is None else group, **kwargs)

    return wrapper


def together(group: Group | None):
    """``group.together()``, or nothing to do in a single process."""
    return group.together() if group is not None else nullcontext()


def share_of(group: Group | None) -> tuple[int, int]:
    """(rank, ranks): which batches of one data set named alike on every rank this rank takes
    (``data.calibration`` applies it; an iterable of the rank's own batches is all its own)."""
    return (0, 1) if group is None else (group.rank, group.size)
