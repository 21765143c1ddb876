"""Batches for the recalibrator: shuffled once with a seed, decoded ahead on worker threads.

Iterating a ``Calibration`` makes one pass; every pass sees the same samples in the same
order, so eval-mode fixed-point passes and repeated runs with one seed are reproducible.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from ..errors import InputError
from ..options import DataOptions
from ..protocols import NoProgress
from ..user_code import DataFunction
from .sources import ImageSpec, open_source

if TYPE_CHECKING:
    from ..protocols import Progress


@dataclass
class Batch:
    inputs: Any
    labels: np.ndarray | None = None

    def first(self, n: int) -> "Batch":
        """The batch cut to its first ``n`` samples (arrays, tensors, or tuples / dicts of them)."""
        def cut(x):
            if isinstance(x, dict):
                return {k: cut(v) if hasattr(v, "shape") else v for k, v in x.items()}
            if isinstance(x, (tuple, list)):
                return type(x)(cut(v) for v in x)
            return x[:n] if getattr(x, "ndim", 0) else x  # a scalar passed along with the batch stays

        return Batch(cut(self.inputs), None if self.labels is None else self.labels[:n])

    @property
    def size(self) -> int:
        x = self.inputs
        if isinstance(x, dict):
            x = next(v for v in x.values() if hasattr(v, "shape"))
        elif isinstance(x, (tuple, list)):
            x = x[0]
        return int(x.shape[0])


class Calibration:
    """A seeded, batched, prefetched stream over a random-access source."""

    def __init__(self, source, batch_size: int = 32, seed: int = 0, samples: int | None = None,
                 skip_bad: bool = False, prefetch: int | None = None, workers: int | None = None):
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"--seed must be an integer >= 0, got {seed!r}")
        self.source = source
        self.origin = str(getattr(source, "origin", getattr(source, "root", "data")))
        self.batch_size = batch_size
        self.seed = seed
        self.repeatable = True
        self.skip_bad = skip_bad
        if workers is not None and workers < 1:
            raise InputError(f"--workers must be at least 1, got {workers}")
        self.workers = workers or usable_cpus()
        self.prefetch = max(1, prefetch or self.workers)  # one batch in flight per worker keeps them all busy
        order = np.random.default_rng(seed).permutation(len(source))
        if samples is not None:
            order = order[:samples]
        if len(order) < 2:
            raise InputError(f"{self.origin}: need at least 2 calibration samples, got {len(order)}")
        self.order = self.drawn = order
        self.shared = False
        self.bad: set[int] = set()

    def take_share(self, rank: int, ranks: int) -> None:
        """Keep only batches ``rank, rank + ranks, ...`` of the sequence (``distributed``): whole batches, the same
        ones a single process makes, so the ranks together see every sample once."""
        self.order = np.concatenate(self._chunks()[rank::ranks] or [self.order[:0]])
        self.shared = ranks > 1

    def _chunks(self) -> list[np.ndarray]:
        """The sample indices of each batch, in order."""
        return [self.order[i:i + self.batch_size] for i in range(0, len(self.order), self.batch_size)]

    def __len__(self) -> int:
        return len(self.order)

    @property
    def has_labels(self) -> bool:
        return getattr(self.source, "labels", None) is not None

    def decoded_bytes(self) -> int:
        """What every sample of a pass takes in memory as ``Cached`` keeps it: an image's decoded pixels (uint8,
        from the size the images are made; 16-bit greyscale takes 4 bytes a pixel, a rare exception), else the
        first sample's size."""
        spec = getattr(self.source, "spec", None)
        if spec is not None and spec.size is not None:
            per_sample = spec.size[0] * spec.size[1] * spec.channels
        else:
            per_sample = int(np.asarray(self._read(int(self.order[0]))).nbytes)
        return per_sample * len(self.order)

    @property
    def _read(self):
        """One sample by index: an image source's decoded pixels (``finish`` makes them model inputs), any
        other source's sample."""
        return getattr(self.source, "pixels", self.source.sample)

    def classes_lost(self) -> list[str]:
        """Classes that --skip-bad left without a single image of those drawn: the statistics then describe
        the other classes only."""
        labels = getattr(self.source, "labels", None)
        if labels is None or not self.bad:
            return []
        kept = set(labels[[i for i in self.drawn if int(i) not in self.bad]].tolist())
        return [self.source.classes[c] for c in sorted(set(labels[self.drawn].tolist()) - kept)]

    def _load(self, indices: np.ndarray, raw: bool = False) -> Batch | None:
        """The batch of samples ``indices``; ``raw``: an image source's pixels, not yet ``finish``ed."""
        xs, kept = [], []
        for i in indices:
            try:
                x = self._read(int(i))
            except InputError as exc:
                if not self.skip_bad:
                    raise InputError(f"{exc}; --skip-bad skips undecodable images") from None
                self.bad.add(int(i))
                continue
            if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
                raise InputError(f"{self.source.name(int(i))}: sample holds NaN or infinite values")
            xs.append(x)
            kept.append(int(i))
        if not xs:
            return None
        shapes = {x.shape for x in xs}
        if len(shapes) > 1:
            raise InputError(f"{self.origin}: samples differ in shape "
                             f"{sorted(shapes)}; give --image-size H W")
        labels = self.source.labels[kept] if self.has_labels else None
        inputs = np.stack(xs)
        return Batch(inputs if raw else self.finish(inputs), labels)

    def finish(self, inputs: np.ndarray) -> np.ndarray:
        """Batched samples as the model takes them (what ``raw_batches`` left undone)."""
        finish = getattr(self.source, "finish", None)
        return inputs if finish is None else finish(inputs)

    def __iter__(self) -> Iterator[Batch]:
        return self.raw_batches(raw=False)

    def raw_batches(self, raw: bool = True) -> Iterator[Batch]:
        """One pass; ``raw``: images as decoded pixels, for ``finish`` to make model inputs of later."""
        chunks = self._chunks()
        kept = 0
        with ThreadPoolExecutor(self.workers, thread_name_prefix="bnrepair-data") as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.submit(self._load, chunk, raw))
                if len(pending) > self.prefetch:
                    batch = pending.popleft().result()
                    if batch is not None:
                        kept += batch.size
                        yield batch
            while pending:
                batch = pending.popleft().result()
                if batch is not None:
                    kept += batch.size
                    yield batch
        if kept < 2 and not self.shared:  # --skip-bad left too few (shared: counted over every rank)
            raise InputError(f"{self.origin}: need at least 2 calibration samples, got {kept} "
                             f"({len(self.bad)} undecodable image(s) skipped)")


class IterableCalibration:
    """Any re-iterable of batches (a list, a DataLoader, a tf.data.Dataset) from the Python API.

    A tuple or list batch gives its ``input_index`` element as the model input (and the next one,
    when present, as labels); a dict is passed through whole (torch: keyword arguments).
    """

    def __init__(self, batches: Iterable, input_index: int = 0, samples: int | None = None,
                 share: tuple[int, int] = (0, 1)):
        self.batches = batches
        self.share = share
        """(rank, ranks): keep batches rank, rank + ranks, ... (the same batches on every rank, shared out)"""
        self.input_index = input_index
        self.samples = samples
        self.origin = "calibration data"
        self.seed = None
        self.bad: set[int] = set()
        self._count: int | None = None
        self.repeatable = _same_batches_each_pass(batches)

    def __len__(self) -> int:
        return self._count or 0

    @property
    def has_labels(self) -> bool:
        return False

    def __iter__(self) -> Iterator[Batch]:
        count, mine = 0, 0
        rank, ranks = self.share
        batches = iter(self.batches)
        for number in itertools.count():
            try:
                item = next(batches)
            except StopIteration:
                break
            except Exception as exc:  # the user's loader failed; its traceback stays chained for API callers
                raise InputError(f"calibration data: reading a batch failed: {type(exc).__name__}: {exc}") from exc
            if isinstance(item, (tuple, list)):
                if not -len(item) <= self.input_index < len(item):
                    raise InputError(f"--input-index {self.input_index}: the batches are tuples of {len(item)}")
                item = item[self.input_index]
            batch = Batch(item)
            try:
                size = batch.size
            except (AttributeError, IndexError, TypeError, StopIteration):
                raise InputError("calibration data: a batch must be an array or tensor (N, ...), or a tuple or dict "
                                 f"of them; got {type(item).__name__}") from None
            last = self.samples is not None and count + size >= self.samples  # an endless loader stops here
            if last:
                batch, size = batch.first(self.samples - count), self.samples - count
            count += size
            if number % ranks == rank:
                mine += size
                yield batch
            if last:
                break
        if count == 0:
            raise InputError("calibration data yielded no batches" if self._count is None else
                             "calibration data yielded no batches on its second pass: a generator runs only once; "
                             "give a list or a re-iterable (a DataLoader, a tf.data.Dataset)")
        self._count = mine


class Cached:
    """Batches read once and kept in memory, for commands that make several passes over few samples. Images are
    kept as their decoded uint8 pixels, a quarter of the float32 inputs they become on each pass."""

    def __init__(self, stream, progress: Progress | None = None):
        progress = progress or NoProgress()
        progress.start_pass(0, len(stream) if hasattr(stream, "__len__") else None, label="reading data")
        self.batches = []
        raw = getattr(stream, "raw_batches", None)
        self.finish = stream.finish if raw is not None else None
        for batch in raw() if raw is not None else stream:
            self.batches.append(batch)
            progress.advance(batch.size)
        progress.end_pass()
        self.origin = getattr(stream, "origin", "calibration data")
        self.seed = getattr(stream, "seed", None)
        self.repeatable = True
        self.bad = getattr(stream, "bad", set())
        self.has_labels = all(b.labels is not None for b in self.batches) and bool(self.batches)

    def __len__(self) -> int:
        return sum(b.size for b in self.batches)

    def __iter__(self) -> Iterator[Batch]:
        if self.finish is None:
            return iter(self.batches)
        return (Batch(self.finish(b.inputs), b.labels) for b in self.batches)


class Joined:
    """``stream``'s consecutive batches joined into forwards of at most ``samples`` samples (at least one batch),
    the same ones every pass: eval mode's passes run without autograd, so a larger forward costs only memory, and
    fewer, larger batches shrink the batch-to-batch spread that its corrected passes are limited by."""

    def __init__(self, stream, samples: int):
        self.stream, self.samples = stream, samples
        self.origin = getattr(stream, "origin", "calibration data")
        self.seed = getattr(stream, "seed", None)
        self.repeatable = getattr(stream, "repeatable", False)

    @property
    def bad(self) -> set[int]:
        return getattr(self.stream, "bad", set())

    @property
    def has_labels(self) -> bool:
        return self.stream.has_labels

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[Batch]:
        pending: list[Batch] = []
        count = 0
        for batch in self.stream:
            size = batch.size
            if pending and count + size > self.samples:
                yield joined(pending)
                pending, count = [], 0
            pending.append(batch)
            count += size
        if pending:
            yield joined(pending)


def joined(batches: list[Batch]) -> Batch:
    """One batch of ``batches``' samples in order (arrays or tensors, or tuples / dicts of them)."""
    if len(batches) == 1:
        return batches[0]

    def join(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: join([v[k] for v in values]) if hasattr(first[k], "shape") else first[k] for k in first}
        if isinstance(first, (tuple, list)):
            return type(first)(join(list(parts)) for parts in zip(*values))
        if not getattr(first, "ndim", 0):
            return first  # a scalar passed along with the batch
        library = type(first).__module__.split(".")[0]
        if library == "torch":
            import torch

            return torch.cat(values)
        if library == "tensorflow":
            import tensorflow as tf

            return tf.concat(values, 0)
        return np.concatenate(values)

    labels = [b.labels for b in batches]
    return Batch(join([b.inputs for b in batches]),
                 None if any(x is None for x in labels) else np.concatenate(labels))


def _same_batches_each_pass(batches) -> bool:
    """A list, tuple or unshuffled DataLoader; a shuffling loader or an unknown iterable may reorder."""
    if isinstance(batches, (list, tuple)):
        return True
    sampler = getattr(batches, "sampler", None)
    return type(sampler).__name__ == "SequentialSampler" and getattr(batches, "batch_sampler", None) is not None


def _endless(data) -> bool:
    """Whether ``data`` says it never ends: a ``tf.data.Dataset`` after ``.repeat()`` (cardinality -1)."""
    cardinality = getattr(data, "cardinality", None)
    try:
        return callable(cardinality) and int(cardinality()) == -1
    except (TypeError, ValueError):
        return False


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers and job schedulers restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def calibration(data, spec: ImageSpec, options: DataOptions = DataOptions(), share: tuple[int, int] = (0, 1)):
    """The right stream for ``data``: a path or array gets the seeded stream, anything else is iterated.
    ``share`` (rank, ranks): this rank's batches of one data set named alike on every rank (a path, an array,
    a ``user_code.DataFunction``; see ``Calibration.take_share``); any other iterable holds the rank's own
    batches (a DDP script's loader with its DistributedSampler) and is all its own."""
    if isinstance(data, (Calibration, IterableCalibration)):
        return data
    if isinstance(data, (str, np.ndarray)) or hasattr(data, "__fspath__"):
        stream = Calibration(open_source(data, spec), options.batch_size, options.seed, options.samples,
                             options.skip_bad, workers=options.workers)
        stream.take_share(*share)
        return stream
    if isinstance(data, DataFunction):
        return IterableCalibration(data.batches(), options.input_index, options.samples, share)
    if hasattr(data, "__iter__"):
        if options.samples is None and _endless(data):
            raise InputError("calibration data: the dataset repeats forever (tf.data's cardinality is infinite); "
                             "give samples=N, or leave out .repeat()")
        return IterableCalibration(data, options.input_index, options.samples)
    raise InputError(f"cannot use {type(data).__name__} as calibration data")


__all__ = ["Batch", "Cached", "Calibration", "IterableCalibration", "calibration"]
