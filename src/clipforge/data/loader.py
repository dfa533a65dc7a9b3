"""Training batches from any source: deterministic per (seed, epoch), split across ranks and workers,
full batches despite bad samples, and exact mid-epoch resume.

Batch boundaries never depend on decoding: a batch is a fixed set of sample positions (an index range
of the epoch's permutation, or the next raw samples of a shard stream) and a bad sample's slot is filled
by a deterministic pick from elsewhere in the epoch. So ``batches(epoch, start_batch=k)`` can skip ``k``
batches without decoding an image and still yield exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from itertools import count
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .samples import BadSample, DataSourceError, SkipCounter
from .sources import MapSource, ShardSource, open_sources

logger = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor]


def _seed(*keys: int) -> int:
    """A 64-bit seed mixing ``keys`` (seed, epoch, rank, batch, purpose ...), all non-negative."""
    return int(np.random.SeedSequence([int(k) % 2 ** 64 for k in keys]).generate_state(1, np.uint64)[0])


@contextmanager
def _seeded(seed: int):
    """Seed torch's CPU generator and Python's ``random`` for random augmentations; restore them after."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def _weighted_copies(groups: list[np.ndarray], weights: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Each group ``int(w)`` times plus a random ``w - int(w)`` fraction of it, concatenated."""
    parts = []
    for items, w in zip(groups, weights):
        parts += [items] * int(w)
        extra = round((w - int(w)) * len(items))
        if extra:
            parts.append(np.sort(rng.choice(items, extra, replace=False)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _fill(pairs: list, draw: Callable[[], tuple | None], tries: int, rng: random.Random, counts: SkipCounter) -> list:
    """Replace the bad (None) entries of a batch by good draws (at most ``tries``), then by copies of good
    entries of the same batch, so the batch keeps its size."""
    for k in range(len(pairs)):
        while pairs[k] is None and tries > 0:
            pairs[k], tries = draw(), tries - 1
    good = [p for p in pairs if p is not None]
    if not good:
        raise DataSourceError(f"cannot fill a batch: every sample tried was bad ({counts.by_reason()}); "
                              "most of the data is unusable, check the source")
    return [p if p is not None else rng.choice(good) for p in pairs]


class _Producer:
    """Makes the batches of one slot (a worker's share) for one epoch; subclasses choose the samples."""

    def __init__(self, preprocess, tokenize, batch_size: int, seed: int, rank: int, world_size: int,
                 resampled: bool, weights: list[float], max_bad_fraction: float):
        self.preprocess, self.tokenize, self.batch_size = preprocess, tokenize, batch_size
        self.seed, self.rank, self.world_size, self.resampled = seed, rank, world_size, resampled
        self.weights, self.max_bad_fraction = weights, max_bad_fraction

    def prepare(self, epoch: int) -> None:
        """Precompute per-epoch state in the main process, so forked workers share it."""

    def _attempt(self, source, read, item, counts: SkipCounter) -> tuple | None:
        try:
            pair = read(item)
        except BadSample as bad:
            counts.record(source.name, bad.reason)
            return None
        counts.record(source.name)
        return pair

    def _tensors(self, pairs: list, epoch: int, g: int) -> Batch:
        with _seeded(_seed(self.seed, epoch, self.rank, g, 9)):
            images = torch.stack([self.preprocess(image) for image, _ in pairs])  # (B, 3, H, W)
        tokens = self.tokenize([caption for _, caption in pairs])  # (B, L)
        return images, tokens

    def slot_batches(self, epoch: int, slot: int, num_slots: int, start: int, total: int | None) -> Iterator:
        """(images, tokens, counts) for the batches ``g >= start`` of this rank with ``g % num_slots == slot``."""
        seen = SkipCounter(self.max_bad_fraction)
        try:
            for g, pairs, counts in self._slot_pairs(epoch, slot, num_slots, start, total):
                seen.merge(counts.to_dict())
                seen.check()
                yield (*self._tensors(pairs, epoch, g), counts.to_dict())
        except DataSourceError as error:  # sent in-band: the main process raises it and stops workers cleanly
            yield None, None, {"error": str(error)}

    def _slot_pairs(self, epoch, slot, num_slots, start, total) -> Iterator[tuple[int, list, SkipCounter]]:
        raise NotImplementedError


def _first_local(slot: int, num_slots: int, start: int) -> int:
    """The first local batch index ``l`` of a slot whose global index ``l * num_slots + slot`` is >= start."""
    return max(0, -(-(start - slot) // num_slots))


class _MapProducer(_Producer):
    """Batches from random-access sources: batch g of rank r is a slice of r's strided share of the
    epoch's permutation (or, resampled, draws with replacement seeded by (seed, epoch, rank, g))."""

    def __init__(self, sources: list[MapSource], num_samples: int | None, **common):
        super().__init__(**common)
        self.sources = sources
        self.sizes = np.array([len(s) for s in sources], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        natural = int(sum(w * n for w, n in zip(self.weights, self.sizes)))
        self.num_samples = num_samples if num_samples is not None else None if self.resampled else natural
        self._orders: dict[int, np.ndarray] = {}

    def steps(self) -> int | None:
        return None if self.num_samples is None else self.num_samples // self.world_size // self.batch_size

    def prepare(self, epoch: int) -> None:
        if not self.resampled:
            self._order(epoch)

    def _order(self, epoch: int) -> np.ndarray:
        """All ranks' sample ids of an epoch: weighted copies, shuffled; more passes if num_samples asks."""
        if epoch not in self._orders:
            groups = [np.arange(a, b) for a, b in zip(self.offsets[:-1], self.offsets[1:])]
            passes = []
            for p in count():
                rng = np.random.default_rng(_seed(self.seed, epoch, p, 1))
                passes.append(rng.permutation(_weighted_copies(groups, self.weights, rng)))
                if sum(map(len, passes)) >= self.num_samples or not len(passes[-1]):
                    break
            self._orders = {epoch: np.concatenate(passes)[: self.num_samples]}
        return self._orders[epoch]

    def _batch_ids(self, epoch: int, g: int) -> np.ndarray:
        b = self.batch_size
        if self.resampled:
            return self._random_ids(np.random.default_rng(_seed(self.seed, epoch, self.rank, g, 2)), b)
        share = self._order(epoch)[self.rank :: self.world_size]
        return share[g * b : (g + 1) * b]

    def _random_ids(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mass = np.asarray(self.weights) * self.sizes
        which = rng.choice(len(self.sources), size=n, p=mass / mass.sum())
        return self.offsets[which] + (rng.random(n) * self.sizes[which]).astype(np.int64)

    def _load(self, gid: int, counts: SkipCounter) -> tuple | None:
        k = int(np.searchsorted(self.offsets, gid, side="right") - 1)
        source = self.sources[k]
        return self._attempt(source, source.load, int(gid - self.offsets[k]), counts)

    def _slot_pairs(self, epoch, slot, num_slots, start, total):
        for local in count(_first_local(slot, num_slots, start)):
            g = local * num_slots + slot
            if total is not None and g >= total:
                return
            counts = SkipCounter()
            pairs = [self._load(i, counts) for i in self._batch_ids(epoch, g)]
            if None in pairs:
                rng = random.Random(_seed(self.seed, epoch, self.rank, g, 3))

                def draw():  # any sample of the epoch (resampled: of the weighted sources)
                    if self.resampled:
                        return self._load(self._random_ids(np.random.default_rng(rng.getrandbits(64)), 1)[0], counts)
                    order = self._order(epoch)
                    return self._load(order[rng.randrange(len(order))], counts)

                pairs = _fill(pairs, draw, 4 * len(pairs) + 16, rng, counts)
            yield g, pairs, counts


_PASS_END = object()  # marks the end of one pass over a slot's shards


class _ShuffleBuffer:
    """Sample-level shuffling of a stream: keeps up to ``size`` items and emits a random one per step.

    At a pass end marker it drains before reading on, so one pass's samples never mix with the next
    pass's copies of them.
    """

    def __init__(self, items: Iterator, size: int, rng: random.Random):
        self.source, self.size, self.rng, self.items, self.draining = items, max(1, size), rng, [], False

    def __next__(self):
        while not self.draining and len(self.items) < self.size:
            item = next(self.source, None)
            if item is None:  # the source ended
                break
            if item is _PASS_END:
                self.draining = True
            else:
                self.items.append(item)
        if not self.items:
            if not self.draining:
                raise StopIteration
            self.draining = False
            return next(self)
        k = self.rng.randrange(len(self.items))
        self.items[k], self.items[-1] = self.items[-1], self.items[k]
        return self.items.pop()


class _StreamProducer(_Producer):
    """Batches from WebDataset shards. Each (rank, slot) reads its own shards of the epoch's shuffled
    shard list (or, with fewer shards than ranks x slots, every shard keeping every n-th sample; or,
    resampled, shards drawn with replacement), shuffles through a buffer, and cuts batches of the next
    ``batch_size`` raw samples. A bad sample's slot takes a copy of a random sample in the buffer."""

    def __init__(self, sources: list[ShardSource], num_samples: int | None, shuffle_buffer: int, **common):
        super().__init__(**common)
        self.sources, self.shuffle_buffer = sources, shuffle_buffer
        self.shards = [(k, url) for k, s in enumerate(sources) for url in s.urls]
        self.groups = np.split(np.arange(len(self.shards)), np.cumsum([len(s.urls) for s in sources])[:-1])
        if num_samples is None and not self.resampled:
            sizes = [s.size() for s in sources]
            if None in sizes:
                raise ValueError(f"cannot tell how many samples {sources[sizes.index(None)].name!r} holds (no "
                                 "sizes.json or *_stats.json beside remote shards); pass num_samples")
            num_samples = int(sum(w * n for w, n in zip(self.weights, sizes)))
        self.num_samples = num_samples

    def steps(self) -> int | None:
        return None if self.num_samples is None else self.num_samples // self.world_size // self.batch_size

    def split_mode(self, num_slots: int) -> str:
        """How streams are split: "resampled", "shards" (per rank and worker) or "samples"."""
        if self.resampled:
            return "resampled"
        enough = len(self._epoch_shards(0, 0)) >= self.world_size * num_slots
        return "shards" if enough else "samples"

    def _epoch_shards(self, epoch: int, p: int) -> np.ndarray:
        rng = np.random.default_rng(_seed(self.seed, epoch, p, 4))
        return rng.permutation(_weighted_copies(self.groups, self.weights, rng))

    def _raw_shard(self, shard: int, pending: SkipCounter) -> Iterator[tuple[int, dict]]:
        k, url = self.shards[shard]
        return ((k, raw) for raw in self.sources[k].raw_samples([url], pending))

    def _raw_stream(self, epoch: int, slot: int, num_slots: int, pending: SkipCounter) -> Iterator:
        """This (rank, slot)'s endless stream of undecoded (source index, sample) pairs."""
        if self.resampled:
            rng = np.random.default_rng(_seed(self.seed, epoch, self.rank, slot, 5))
            mass = np.concatenate([np.full(len(g), w) for g, w in zip(self.groups, self.weights)])
            while True:
                yield from self._raw_shard(int(rng.choice(len(self.shards), p=mass / mass.sum())), pending)
        streams, stream = self.world_size * num_slots, self.rank * num_slots + slot
        for p in count():
            shards, produced = self._epoch_shards(epoch, p), 0
            mine = shards[self.rank :: self.world_size][slot::num_slots] if len(shards) >= streams else shards
            samples = (x for shard in mine for x in self._raw_shard(int(shard), pending))
            if len(shards) < streams:  # too few shards: everyone reads all, keeping every n-th sample
                samples = (x for n, x in enumerate(samples) if n % streams == stream)
            for item in samples:
                produced += 1
                yield item
            yield _PASS_END
            if not produced:
                raise DataSourceError(f"no samples for rank {self.rank} worker {slot} in one pass over "
                                      f"{len(shards)} shards ({pending.by_reason()}); too little data or bad shards")

    def _slot_pairs(self, epoch, slot, num_slots, start, total):
        pending = SkipCounter()
        buffer = _ShuffleBuffer(self._raw_stream(epoch, slot, num_slots, pending), self.shuffle_buffer,
                                random.Random(_seed(self.seed, epoch, self.rank, slot, 6)))
        first = _first_local(slot, num_slots, start)
        for _ in range(first * self.batch_size):  # resume: skip without decoding
            next(buffer)
        for local in count(first):
            g = local * num_slots + slot
            if total is not None and g >= total:
                return
            raws = [next(buffer) for _ in range(self.batch_size)]
            counts = SkipCounter()
            pairs = [self._decode(k, raw, counts) for k, raw in raws]
            if None in pairs:
                rng = random.Random(_seed(self.seed, epoch, self.rank, g, 7))

                def draw():  # a copy of a random sample still waiting in the buffer
                    return self._decode(*rng.choice(buffer.items), counts) if buffer.items else None

                pairs = _fill(pairs, draw, 4 * len(pairs) + 16, rng, counts)
            counts.merge(pending.take())
            yield g, pairs, counts

    def _decode(self, k: int, raw: dict, counts: SkipCounter) -> tuple | None:
        return self._attempt(self.sources[k], self.sources[k].decode, raw, counts)


class _BatchStream(IterableDataset):
    """One epoch's batches from ``start``: worker w makes those with ``g % num_slots == (w + start) % num_slots``,
    so the DataLoader's round-robin over workers yields them in order ``start, start + 1, ...``."""

    def __init__(self, producer: _Producer, epoch: int, start: int, num_slots: int, total: int | None):
        super().__init__()
        self.producer, self.epoch, self.start, self.num_slots, self.total = producer, epoch, start, num_slots, total

    def __iter__(self):
        info = get_worker_info()
        slot = ((info.id if info else 0) + self.start) % self.num_slots
        return self.producer.slot_batches(self.epoch, slot, self.num_slots, self.start, self.total)


class TrainData:
    """The training batches of one rank: ``batches(epoch, start_batch)`` and the skip counts.

    ``steps_per_epoch`` is the number of batches per epoch on each rank (None for an endless stream);
    ``num_samples`` the samples per epoch over all ranks; ``split_by`` how data is split over ranks and
    workers ("index", "shards", "samples" or "resampled").
    """

    def __init__(self, producer: _Producer, workers: int, pin_memory: bool, counter: SkipCounter, split_by: str):
        self._producer, self._workers, self._pin_memory, self._counter = producer, workers, pin_memory, counter
        self.steps_per_epoch: int | None = producer.steps()
        self.num_samples: int | None = producer.num_samples
        self.batch_size, self.split_by = producer.batch_size, split_by

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """(images FloatTensor[B, 3, H, W], tokens LongTensor[B, L]) of ``epoch`` from batch ``start_batch``.

        Deterministic from (seed, epoch); ``start_batch=k`` yields exactly batches k, k+1, ... of an
        uninterrupted epoch (with the same number of workers for shard sources).
        """
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"epoch and start_batch must be >= 0, got {epoch} and {start_batch}")
        self._producer.prepare(epoch)
        stream = _BatchStream(self._producer, epoch, start_batch, max(1, self._workers), self.steps_per_epoch)
        if self._workers:
            stream = DataLoader(stream, batch_size=None, num_workers=self._workers, pin_memory=self._pin_memory)
        return self._counted(stream)

    def _counted(self, stream) -> Iterator[Batch]:
        iterator = iter(stream)
        try:
            for images, tokens, counts in iterator:
                if "error" in counts:
                    raise DataSourceError(counts["error"])
                self._counter.merge(counts)
                self._counter.check()
                yield images, tokens
        finally:
            del iterator  # a DataLoader iterator stops its workers here, not when the traceback is freed

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason, cumulative over epochs, workers and sources (see ``sources.REASONS``)."""
        return self._counter.by_reason()


def _parse_weights(weights, parts: int) -> list[float]:
    if weights is None:
        return [1.0] * parts
    values = [float(w) for w in (weights.split("::") if isinstance(weights, str) else weights)]
    if len(values) != parts or any(not w > 0 for w in values):
        raise ValueError(f"weights {weights!r} must give one positive number per '::'-separated source ({parts})")
    return values


def build_train_data(spec: str, preprocess, tokenize, batch_size: int, *, seed: int = 0, workers: int = 0,
                     rank: int = 0, world_size: int = 1, resampled: bool = False, weights=None,
                     csv_img_key: str = "filepath", csv_caption_key: str = "caption", csv_separator: str | None = None,
                     max_pixels: int | None = None, num_samples: int | None = None, shuffle_buffer: int = 1000,
                     pin_memory: bool = False, max_bad_fraction: float = 0.5) -> TrainData:
    """Open ``spec`` (CSV/TSV, caption folder, WebDataset shards, ``builtin[:N]``; ``::`` mixes sources,
    ``weights`` are per-source upsampling factors) as this rank's training batches.

    ``preprocess`` maps a PIL image to FloatTensor[3, H, W]; ``tokenize`` a list of captions to
    LongTensor[B, L]. ``num_samples`` sets the samples per epoch (all ranks); resampled without it is an
    endless stream. See :class:`TrainData`.
    """
    if batch_size < 1 or workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1, workers >= 0 and 0 <= rank < world_size; got batch_size="
                         f"{batch_size}, workers={workers}, rank={rank}, world_size={world_size}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    counter = SkipCounter(max_bad_fraction)
    sources = open_sources(spec, counter=counter, max_pixels=max_pixels, csv_img_key=csv_img_key,
                           csv_caption_key=csv_caption_key, csv_separator=csv_separator, builtin_samples=num_samples)
    kinds = {isinstance(s, ShardSource) for s in sources}
    if len(kinds) > 1:
        raise ValueError(f"{spec!r} mixes WebDataset shards with CSV/folder/builtin sources; "
                         "mix sources of one family, or convert one of them")
    common = dict(preprocess=preprocess, tokenize=tokenize, batch_size=batch_size, seed=seed, rank=rank,
                  world_size=world_size, resampled=resampled, weights=_parse_weights(weights, len(sources)),
                  max_bad_fraction=max_bad_fraction)
    if True in kinds:
        producer = _StreamProducer(sources, num_samples, shuffle_buffer, **common)
        split_by = producer.split_mode(max(1, workers))
        if split_by == "samples":
            logger.warning("%s has fewer shards than ranks x workers (%d x %d): every worker reads all shards and "
                           "keeps every %d-th sample", spec, world_size, max(1, workers), world_size * max(1, workers))
    else:
        producer, split_by = _MapProducer(sources, num_samples, **common), "resampled" if resampled else "index"
    data = TrainData(producer, workers, pin_memory, counter, split_by)
    if data.steps_per_epoch == 0:
        raise ValueError(f"{spec!r} gives {data.num_samples} samples per epoch, fewer than batch_size x world_size "
                         f"= {batch_size * world_size}; use a smaller batch or more data")
    return data
