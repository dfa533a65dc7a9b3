"""Training batches from any source: deterministic per (seed, epoch), split across ranks and workers,
full batches despite bad samples, and exact mid-epoch resume.

Batch boundaries never depend on decoding: a batch is a fixed set of sample positions (an index range
of the epoch's permutation, or the next raw samples of a shard stream) and a bad sample's place is filled
by a deterministic pick from elsewhere in the epoch. So ``batches(epoch, start_batch=k)`` can skip ``k``
batches without decoding an image and still yield exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from enum import IntEnum
from itertools import count
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.labelled import LabelledSource
from clipforge.data.samples import BadSample, DataSourceError, SkipCounter
from clipforge.data.sources import MapSource, ShardSource, open_sources

logger = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor]


def _one_caption_each(captions: list, seed: int) -> list[str]:
    """One caption per sample: a sample with several (a list) gets one drawn from ``seed``, the batch's own
    stream, so a resumed run draws the same; single captions (and class labels) draw nothing."""
    if not any(isinstance(c, list) for c in captions):
        return captions
    rng = random.Random(seed)
    return [c[rng.randrange(len(c))] if isinstance(c, list) else c for c in captions]


def _label_tensor(labels: list[int]) -> torch.Tensor:
    return torch.tensor(labels, dtype=torch.long)  # (B,)


class _RngStream(IntEnum):
    """The purpose key that ``_seed`` mixes in last, one per random stream. The values are part of
    every data order (and so of every checkpoint's resume position): never renumber them."""

    EPOCH_ORDER = 1  # random-access sources: one pass's permutation of the epoch's sample ids
    RESAMPLED_BATCH = 2  # random-access sources, resampled: a batch's draws with replacement
    MAP_REFILL = 3  # random-access sources: the replacements of a batch's bad samples
    SHARD_ORDER = 4  # shard sources: one pass's permutation of the shard list
    RESAMPLED_SHARDS = 5  # shard sources, resampled: a worker's draws of shards
    SHUFFLE_BUFFER = 6  # shard sources: a worker's shuffle buffer
    STREAM_REFILL = 7  # shard sources: the replacements of a batch's bad samples
    CAPTION_CHOICE = 8  # samples with several captions: which one each sample of a batch trains on
    AUGMENT = 9  # the random augmentations of a batch's images


def _seed(*keys: int) -> int:
    """A 64-bit seed mixing ``keys`` (seed, epoch, rank, batch, ``_RngStream`` ...), all non-negative."""
    return int(np.random.SeedSequence([int(key) % 2 ** 64 for key in keys]).generate_state(1, np.uint64)[0])


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
    """Each group ``int(weight)`` times plus a random ``weight - int(weight)`` fraction of it, concatenated."""
    parts = []
    for items, weight in zip(groups, weights):
        parts += [items] * int(weight)
        extra = round((weight - int(weight)) * len(items))
        if extra:
            parts.append(np.sort(rng.choice(items, extra, replace=False)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _fill(pairs: list, draw: Callable[[], tuple | None], rng: random.Random, counts: SkipCounter,
          where: str) -> list:
    """Replace the bad (None) entries of a batch by good draws, then by copies of good entries of the
    same batch, so the batch keeps its size; ``where`` names the sources in the error if all are bad."""
    tries = 4 * len(pairs) + 16  # enough for a batch that is mostly bad, bounded for a source that is all bad
    for index in range(len(pairs)):
        while pairs[index] is None and tries > 0:
            pairs[index], tries = draw(), tries - 1
    good = [pair for pair in pairs if pair is not None]
    if not good:
        raise DataSourceError(f"cannot fill a batch from {where}: every sample tried was bad "
                              f"({counts.by_reason()}, e.g. {next(iter(counts.examples.values()), '?')}); most "
                              "of the data is unusable, check the source")
    return [pair if pair is not None else rng.choice(good) for pair in pairs]


class _WorkerFailure:
    """A worker's ``DataSourceError``, sent in-band as its last item, so that the main process raises
    it again and stops the workers cleanly."""

    def __init__(self, message: str):
        self.message = message


class _Producer:
    """Makes the batches of one worker slot (a worker's share of the batches) for one epoch; subclasses
    choose the samples and set ``num_samples``."""

    num_samples: int | None

    def __init__(self, preprocess, tokenize, batch_size: int, seed: int, rank: int, world_size: int,
                 resampled: bool, weights: list[float], max_bad_fraction: float):
        self.preprocess, self.tokenize, self.batch_size = preprocess, tokenize, batch_size
        self.seed, self.rank, self.world_size, self.resampled = seed, rank, world_size, resampled
        self.weights, self.max_bad_fraction = weights, max_bad_fraction

    def steps(self) -> int | None:
        """Batches per epoch on each rank; None for an endless stream."""
        return None if self.num_samples is None else self.num_samples // self.world_size // self.batch_size

    def _weighted_size(self, sizes) -> int:
        """Samples in one pass over the sources, each counted ``weight`` times."""
        return int(sum(weight * size for weight, size in zip(self.weights, sizes)))

    def prepare(self, epoch: int) -> None:
        """Precompute per-epoch state in the main process, so forked workers share it."""

    def _attempt(self, source, read, item, counts: SkipCounter, retry: bool = False) -> tuple | None:
        """The sample's (image, caption), or None if it is bad; counted in ``counts`` unless ``retry`` (a
        draw to fill a bad sample's place, which may meet a sample counted at its own place)."""
        try:
            pair = read(item)
            self._check_size(pair[0], source, item)
        except BadSample as bad:
            if not retry:
                counts.record(source.name, bad.reason, detail=str(bad))
            return None
        if not retry:
            counts.record(source.name)
        return pair

    def _check_size(self, image, source, item) -> None:
        """Refuse, before preprocessing, an image the transform would refuse (e.g. a strip whose resized size
        exceeds the pixel limit), so that it is skipped like one that cannot be decoded."""
        check = getattr(self.preprocess, "resized_size", None)
        if check is not None:
            try:
                check(*image.size)
            except BadSample as bad:
                raise BadSample(bad.reason, f"{source.describe(item)}: {bad}") from None

    def _tensors(self, pairs: list, epoch: int, batch_index: int) -> Batch:
        with _seeded(_seed(self.seed, epoch, self.rank, batch_index, _RngStream.AUGMENT)):
            images = torch.stack([self.preprocess(image) for image, _ in pairs])  # (B, 3, H, W)
        tokens = self.tokenize(_one_caption_each([caption for _, caption in pairs],
                                                 _seed(self.seed, epoch, self.rank, batch_index,
                                                       _RngStream.CAPTION_CHOICE)))  # (B, L)
        return images, tokens

    def slot_batches(self, epoch: int, worker_slot: int, num_slots: int, start: int, total: int | None) -> Iterator:
        """(images, tokens, counts) for the batches ``batch_index >= start`` of this rank with
        ``batch_index % num_slots == worker_slot``; a ``_WorkerFailure`` last if the data fails."""
        seen = SkipCounter(self.max_bad_fraction)
        try:
            for batch_index, pairs, counts in self._slot_pairs(epoch, worker_slot, num_slots, start, total):
                seen.merge(counts.to_dict())
                seen.check()
                yield (*self._tensors(pairs, epoch, batch_index), counts.to_dict())
        except DataSourceError as error:
            yield _WorkerFailure(str(error))

    def _slot_pairs(self, epoch, worker_slot, num_slots, start, total) -> Iterator[tuple[int, list, SkipCounter]]:
        raise NotImplementedError


def _first_local(worker_slot: int, num_slots: int, start: int) -> int:
    """The first local batch index ``local`` of a worker slot whose batch index
    ``local * num_slots + worker_slot`` is >= start."""
    return max(0, -(-(start - worker_slot) // num_slots))


class _MapProducer(_Producer):
    """Batches from random-access sources: batch i of rank r is a slice of r's strided share of the
    epoch's permutation (or, resampled, draws with replacement seeded by (seed, epoch, rank, i))."""

    def __init__(self, sources: list[MapSource], num_samples: int | None, **common):
        super().__init__(**common)
        self.sources = sources
        self.sizes = np.array([len(source) for source in sources], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        natural = self._weighted_size(self.sizes)
        self.num_samples = num_samples if num_samples is not None else None if self.resampled else natural
        self._orders: dict[int, np.ndarray] = {}

    def prepare(self, epoch: int) -> None:
        if not self.resampled:
            self._order(epoch)

    def _order(self, epoch: int) -> np.ndarray:
        """All ranks' sample ids of an epoch: weighted copies, shuffled; more passes if num_samples asks."""
        if epoch not in self._orders:
            groups = [np.arange(begin, end) for begin, end in zip(self.offsets[:-1], self.offsets[1:])]
            passes = []
            for pass_index in count():
                rng = np.random.default_rng(_seed(self.seed, epoch, pass_index, _RngStream.EPOCH_ORDER))
                passes.append(rng.permutation(_weighted_copies(groups, self.weights, rng)))
                if sum(map(len, passes)) >= self.num_samples or not len(passes[-1]):
                    break
            self._orders = {epoch: np.concatenate(passes)[: self.num_samples]}
        return self._orders[epoch]

    def _batch_ids(self, epoch: int, batch_index: int) -> np.ndarray:
        size = self.batch_size
        if self.resampled:
            rng = np.random.default_rng(_seed(self.seed, epoch, self.rank, batch_index, _RngStream.RESAMPLED_BATCH))
            return self._random_ids(rng, size)
        share = self._order(epoch)[self.rank :: self.world_size]
        return share[batch_index * size : (batch_index + 1) * size]

    def _random_ids(self, rng: np.random.Generator, num_ids: int) -> np.ndarray:
        mass = np.asarray(self.weights) * self.sizes
        which = rng.choice(len(self.sources), size=num_ids, p=mass / mass.sum())
        return self.offsets[which] + (rng.random(num_ids) * self.sizes[which]).astype(np.int64)

    def _load(self, sample_id: int, counts: SkipCounter, retry: bool = False) -> tuple | None:
        source_index = int(np.searchsorted(self.offsets, sample_id, side="right") - 1)
        source = self.sources[source_index]
        return self._attempt(source, source.load, int(sample_id - self.offsets[source_index]), counts, retry)

    def _slot_pairs(self, epoch, worker_slot, num_slots, start, total):
        for local in count(_first_local(worker_slot, num_slots, start)):
            batch_index = local * num_slots + worker_slot
            if total is not None and batch_index >= total:
                return
            counts = SkipCounter()
            pairs = [self._load(sample_id, counts) for sample_id in self._batch_ids(epoch, batch_index)]
            if None in pairs:
                rng = random.Random(_seed(self.seed, epoch, self.rank, batch_index, _RngStream.MAP_REFILL))

                def draw():  # any sample of the epoch (resampled: of the weighted sources)
                    if self.resampled:
                        sample_id = self._random_ids(np.random.default_rng(rng.getrandbits(64)), 1)[0]
                        return self._load(sample_id, counts, retry=True)
                    order = self._order(epoch)
                    return self._load(order[rng.randrange(len(order))], counts, retry=True)

                pairs = _fill(pairs, draw, rng, counts, ", ".join(repr(s.name) for s in self.sources))
            yield batch_index, pairs, counts


_PASS_END = object()  # marks the end of one pass over a worker slot's shards


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
        pick = self.rng.randrange(len(self.items))
        self.items[pick], self.items[-1] = self.items[-1], self.items[pick]
        return self.items.pop()


class _StreamProducer(_Producer):
    """Batches from WebDataset shards. Each (rank, worker slot) reads its own shards of the epoch's shuffled
    shard list (or, with fewer shards than ranks x slots, every shard keeping every n-th sample; or,
    resampled, shards drawn with replacement), shuffles through a buffer, and cuts batches of the next
    ``batch_size`` raw samples. A bad sample's place takes a copy of a random sample in the buffer."""

    def __init__(self, sources: list[ShardSource], num_samples: int | None, shuffle_buffer: int, **common):
        super().__init__(**common)
        self.sources, self.shuffle_buffer = sources, shuffle_buffer
        self.shards = [(source_index, url) for source_index, source in enumerate(sources) for url in source.urls]
        self.groups = np.split(np.arange(len(self.shards)), np.cumsum([len(source.urls) for source in sources])[:-1])
        if num_samples is None and not self.resampled:
            sizes = [source.size() for source in sources]
            if None in sizes:
                raise ValueError(f"cannot tell how many samples {sources[sizes.index(None)].name!r} holds (no "
                                 "sizes.json or *_stats.json beside remote shards); pass num_samples")
            num_samples = self._weighted_size(sizes)
        self.num_samples = num_samples

    def split_mode(self, num_slots: int) -> str:
        """How streams are split: "resampled", "shards" (per rank and worker) or "samples"."""
        if self.resampled:
            return "resampled"
        enough = len(self._epoch_shards(0, 0)) >= self.world_size * num_slots
        return "shards" if enough else "samples"

    def _epoch_shards(self, epoch: int, pass_index: int) -> np.ndarray:
        rng = np.random.default_rng(_seed(self.seed, epoch, pass_index, _RngStream.SHARD_ORDER))
        return rng.permutation(_weighted_copies(self.groups, self.weights, rng))

    def _raw_shard(self, shard: int, pending: SkipCounter) -> Iterator[tuple[int, dict]]:
        source_index, url = self.shards[shard]
        return ((source_index, raw) for raw in self.sources[source_index].raw_samples([url], pending))

    def _raw_stream(self, epoch: int, worker_slot: int, num_slots: int, pending: SkipCounter) -> Iterator:
        """This (rank, worker slot)'s endless stream of undecoded (source index, sample) pairs."""
        if self.resampled:
            rng = np.random.default_rng(_seed(self.seed, epoch, self.rank, worker_slot, _RngStream.RESAMPLED_SHARDS))
            mass = np.concatenate([np.full(len(group), weight) for group, weight in zip(self.groups, self.weights)])
            while True:
                yield from self._raw_shard(int(rng.choice(len(self.shards), p=mass / mass.sum())), pending)
        streams, stream = self.world_size * num_slots, self.rank * num_slots + worker_slot
        for pass_index in count():
            shards, produced = self._epoch_shards(epoch, pass_index), 0
            mine = shards[self.rank :: self.world_size][worker_slot::num_slots] if len(shards) >= streams else shards
            samples = (item for shard in mine for item in self._raw_shard(int(shard), pending))
            if len(shards) < streams:  # too few shards: everyone reads all, keeping every n-th sample
                samples = (item for position, item in enumerate(samples) if position % streams == stream)
            for item in samples:
                produced += 1
                yield item
            yield _PASS_END
            if not produced:
                raise DataSourceError(f"no samples for rank {self.rank} worker {worker_slot} in one pass over "
                                      f"{len(shards)} shards ({pending.by_reason()}); too little data or bad shards")

    def _slot_pairs(self, epoch, worker_slot, num_slots, start, total):
        pending = SkipCounter()
        buffer_rng = random.Random(_seed(self.seed, epoch, self.rank, worker_slot, _RngStream.SHUFFLE_BUFFER))
        buffer = _ShuffleBuffer(self._raw_stream(epoch, worker_slot, num_slots, pending), self.shuffle_buffer,
                                buffer_rng)
        first = _first_local(worker_slot, num_slots, start)
        for _ in range(first * self.batch_size):  # resume: skip without decoding
            next(buffer)
        for local in count(first):
            batch_index = local * num_slots + worker_slot
            if total is not None and batch_index >= total:
                return
            raws = [next(buffer) for _ in range(self.batch_size)]
            counts = SkipCounter()
            pairs = [self._decode(source_index, raw, counts) for source_index, raw in raws]
            if None in pairs:
                rng = random.Random(_seed(self.seed, epoch, self.rank, batch_index, _RngStream.STREAM_REFILL))

                def draw():  # a copy of a random sample still waiting in the buffer
                    return self._decode(*rng.choice(buffer.items), counts, retry=True) if buffer.items else None

                pairs = _fill(pairs, draw, rng, counts, ", ".join(repr(s.name) for s in self.sources))
            counts.merge(pending.take())
            yield batch_index, pairs, counts

    def _decode(self, source_index: int, raw: dict, counts: SkipCounter, retry: bool = False) -> tuple | None:
        source = self.sources[source_index]
        return self._attempt(source, source.decode, raw, counts, retry)


class _BatchStream(IterableDataset):
    """One epoch's batches from ``start``: worker ``w`` makes those whose batch index ``i`` has
    ``i % num_slots == (w + start) % num_slots`` (its worker slot), so the DataLoader's round-robin over
    workers yields them in order ``start, start + 1, ...``."""

    def __init__(self, producer: _Producer, epoch: int, start: int, num_slots: int, total: int | None):
        super().__init__()
        self.producer, self.epoch, self.start, self.num_slots, self.total = producer, epoch, start, num_slots, total

    def __iter__(self):
        info = get_worker_info()
        worker_slot = ((info.id if info else 0) + self.start) % self.num_slots
        return self.producer.slot_batches(self.epoch, worker_slot, self.num_slots, self.start, self.total)


class TrainData:
    """The training batches of one rank: ``batches(epoch, start_batch)`` and the skip counts.

    ``classnames`` are the classes of a labelled set (whose batches hold labels instead of tokens), else None.

    ``steps_per_epoch`` is the number of batches per epoch on each rank (None for an endless stream);
    ``num_samples`` the samples per epoch over all ranks; ``split_by`` how data is split over ranks and
    workers ("index", "shards", "samples" or "resampled"; a training run records it in run_config.json).
    """

    def __init__(self, producer: _Producer, workers: int, pin_memory: bool, counter: SkipCounter, split_by: str,
                 classnames: list[str] | None = None):
        self._producer, self._workers, self._pin_memory, self._counter = producer, workers, pin_memory, counter
        self.classnames = classnames
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
            for item in iterator:
                if isinstance(item, _WorkerFailure):
                    raise DataSourceError(item.message)
                images, tokens, counts = item
                self._counter.merge(counts)
                self._counter.check()
                yield images, tokens
        finally:
            del iterator  # a DataLoader iterator stops its workers here, not when the traceback is freed

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason, cumulative over epochs, workers and sources (see ``sources.REASONS``)."""
        return self._counter.by_reason()

    def skip_examples(self) -> dict[str, str]:
        """The message of the first bad sample met for each reason (of this process's batches)."""
        return dict(self._counter.examples)


def _parse_weights(weights, parts: int) -> list[float]:
    if weights is None:
        return [1.0] * parts
    values = [float(weight) for weight in (weights.split("::") if isinstance(weights, str) else weights)]
    if len(values) != parts or any(not weight > 0 for weight in values):
        raise ValueError(f"weights {weights!r} must give one positive number per '::'-separated source ({parts})")
    return values


def build_train_data(spec: str, preprocess, tokenize, batch_size: int, *, seed: int = 0, workers: int = 0,
                     rank: int = 0, world_size: int = 1, resampled: bool = False, weights=None,
                     csv_img_key: str = "filepath", csv_caption_key: str = "caption", csv_separator: str | None = None,
                     max_pixels: int | None = None, num_samples: int | None = None, shuffle_buffer: int = 1000,
                     pin_memory: bool = False, max_bad_fraction: float = 0.5,
                     labelled: LabelledSource | None = None) -> TrainData:
    """Open ``spec`` (CSV/TSV, caption folder, WebDataset shards, ``builtin[:N]``; ``::`` mixes sources,
    ``weights`` are per-source upsampling factors) as this rank's training batches.

    ``labelled``: ``spec`` opened as a labelled set by ``clipforge.data.labelled.open_labelled_source``
    (class folders, a CSV with labels, ``.cls`` shards or ``builtin``); batches are then (images, labels
    LongTensor[B]), ``tokenize`` is not used, and ``TrainData.classnames`` names the labels.

    ``preprocess`` maps a PIL image to FloatTensor[3, H, W]; ``tokenize`` a list of captions to
    LongTensor[B, L]. ``num_samples`` sets the samples per epoch (all ranks); resampled without it is an
    endless stream. See ``TrainData``.
    """
    if batch_size < 1 or workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1, workers >= 0 and 0 <= rank < world_size; got batch_size="
                         f"{batch_size}, workers={workers}, rank={rank}, world_size={world_size}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    counter = SkipCounter(max_bad_fraction)
    if labelled is not None:
        sources, tokenize = [labelled], _label_tensor
    else:
        sources = open_sources(spec, counter=counter, max_pixels=max_pixels, csv_img_key=csv_img_key,
                               csv_caption_key=csv_caption_key, csv_separator=csv_separator,
                               builtin_samples=num_samples)
    kinds = {isinstance(source, ShardSource) for source in sources}
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
    classnames = sources[0].classnames if isinstance(sources[0], LabelledSource) else None
    data = TrainData(producer, workers, pin_memory, counter, split_by, classnames)
    if data.steps_per_epoch == 0:
        raise ValueError(f"{spec!r} gives {data.num_samples} samples per epoch, fewer than batch_size x world_size "
                         f"= {batch_size * world_size}; use a smaller batch or more data")
    return data
