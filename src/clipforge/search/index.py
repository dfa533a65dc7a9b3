"""The search index as one object, whichever store keeps it (a folder, or a PostgreSQL table named by a
``postgresql://`` URL): build or update it from image sources, open it, search it by text, image or item, and
read back its items, vectors and original image bytes."""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from clipforge.data import ImageRef, load_image, read_image_bytes
from clipforge.encode import encode_images, encode_texts
from clipforge.runtime.device import resolve_device
from clipforge.runtime.distributed import process_env
from clipforge.runtime.threads import torch_matmul
from clipforge.search.build import BuildOptions, build
from clipforge.search.ingest import ingest
from clipforge.search.ivfpq import parse_size
from clipforge.search.model import (
    check_precision,
    indexed_precision,
    indexed_spec,
    load_indexed_model,
    prepare_for_queries,
    weights_checksum,
)
from clipforge.search.query import Query, parse_query
from clipforge.search.records import Filters, Item, SearchResult
from clipforge.search.stores import build_target, is_database_url, open_store
from clipforge.search.tags import TAG_THRESHOLD, TAG_TOP, tag_items
from clipforge.search.transfer import copy_index

__all__ = ["Index", "Item", "SearchResult", "is_database_url", "set_threads"]


class Index:
    """A search index: a folder, or a PostgreSQL table (``postgresql://user@host/db?table=photos``).
    ``Index.build`` creates or updates one, ``Index.open`` reads one; the model is loaded on the first text or
    image query."""

    def __init__(self, location: str | os.PathLike, device: str | None = None, float32_mib: float = 0,
                 precision: str | None = None, nprobe: int | None = None):
        if precision is not None:
            check_precision(precision)
        self.store = open_store(location, float32_mib, nprobe)
        # what messages show (a URL without its password); the address itself stays private, for updates
        self.location = self.store.location if is_database_url(location) else Path(location)
        self._address = location
        self.device = device
        self._precision = precision  # the queries' (None: the index's own, where the device allows it)
        self.last_update: dict | None = None  # the summary of the build or update this object ran
        self._lock = threading.RLock()
        self._model = self._preprocess = None

    @property
    def folder(self) -> Path:
        """The index folder (a folder store only)."""
        if self.store.kind != "folder":
            raise AttributeError(f"a {self.store.kind} index has no folder; its location is {self.store.location}")
        return self.location

    @property
    def config(self) -> dict:
        """The model identity and settings the index records (config.json, or the table's meta row)."""
        return self.store.config

    @classmethod
    def open(cls, location: str | os.PathLike, device: str | None = None, float32_mib: float = 0,
             precision: str | None = None, nprobe: int | None = None) -> "Index":
        """Open an existing index. A folder's vectors are memory-mapped; exact search keeps copies of up to
        ``float32_mib`` MiB of them in RAM, made by the first search that needs them: an int8 screen that rules
        out most vectors with a proven bound (from 32,768 vectors), and float32 copies for scans, multiplied
        as they are instead of widening float16 rows chunk by chunk; a long-running service gains and a
        one-off search does not (docs/search.md, "How search works"). A PostgreSQL index searches in the
        database. ``precision``: how text and image queries are encoded, "fp32" or "int8" (None: as the index's
        vectors were, except that an int8 index queried on a GPU encodes in fp32); a precision other than the
        index's is allowed and said once (a ``UserWarning``), since the two kinds of vector differ slightly.
        ``nprobe``: the cells a folder's approximate index probes per query, instead of the number its build
        tuned to reach recall@10 0.95 on its sampled queries (``config.json``): fewer is faster and may miss
        neighbours."""
        return cls(location, device, float32_mib, precision, nprobe)

    @classmethod
    def build(cls, location: str | os.PathLike, sources, model: str, device: str | None = None, batch_size: int = 64,
              workers: int = 2, exclude=(), max_pixels: int | None = None, rebuild: bool = False,
              progress: bool = True, fast_decode: bool = False, approximate: str = "auto",
              random_init: bool = False, max_index_memory: int | str | None = None, video_every: float | None = 5.0,
              video_scenes: bool = True, precision: str | None = None) -> "Index":
        """Create the index, or update it incrementally; the run's summary is on ``last_update``.
        ``model`` is a model spec (``clipforge.io.spec``); ``random_init``: seed-0 random weights of an
        architecture (tests and demos; recorded with the model identity). ``approximate``: build the
        approximate index (faiss IVF-Flat in a folder, HNSW in PostgreSQL) "always", "never", or "auto" (above
        200,000 items); "ivfpq": a folder's compressed faiss IVF-PQ index, on disk and re-ranked exactly, whose
        parameters fit ``max_index_memory`` (bytes, or a size such as "4GB"; with "auto" too, IVF-PQ is chosen
        where IVF-Flat would not fit it). Videos in folders (the ``video`` extra) become an item per frame:
        one every ``video_every`` seconds (None: only the first) and, with ``video_scenes``, one at each scene
        change. ``precision``: "fp32" or "int8" (the CPU only: int8 linear layers, faster, vectors within a
        cosine of about 0.999 of float32's; recorded in the model identity, and an index holds one kind); None:
        the existing index's, else "fp32"."""
        options = BuildOptions(batch_size, workers, tuple(exclude), max_pixels, fast_decode, progress, rebuild,
                               approximate, _size(max_index_memory), video_every, video_scenes)
        summary = build(build_target(location), sources, str(model), device, options, random_init, precision)
        index = cls(location, device)
        index.last_update = summary
        index._tag_new_items()
        return index

    @classmethod
    def copy(cls, source: str | os.PathLike, destination: str | os.PathLike, rebuild: bool = False,
             approximate: str = "auto", progress: bool = True, device: str | None = None,
             max_index_memory: int | str | None = None) -> "Index":
        """Copy the index at ``source`` into ``destination`` (folder to PostgreSQL or back, or the same kind)
        with its ids and vectors, encoding nothing; a copy cut short continues where it stopped when run
        again. The summary is on ``last_update``. ``approximate`` and ``max_index_memory`` as ``build``."""
        summary = copy_index(source, destination, rebuild, approximate, progress, _size(max_index_memory))
        index = cls(destination, device)
        index.last_update = summary
        return index

    @classmethod
    def from_embeddings(cls, folder: str | os.PathLike, location: str | os.PathLike, rebuild: bool = False,
                        approximate: str = "auto", progress: bool = True, device: str | None = None,
                        max_index_memory: int | str | None = None) -> "Index":
        """Create or add to the index at ``location`` from an embeddings folder written by ``clipforge embed``
        (clip-retrieval's layout), taking its vectors and metadata as they are, after checking that its model
        is the index's. The summary is on ``last_update``. ``approximate`` and ``max_index_memory`` as
        ``build``."""
        summary = ingest(location, folder, rebuild, approximate, progress, _size(max_index_memory))
        index = cls(location, device)
        index.last_update = summary
        return index

    def update(self, sources, **options) -> dict:
        """Update this index from ``sources`` (options as ``build``, with this index's model and precision)."""
        device = options.pop("device", self.device)
        precision = options.pop("precision", None)
        if "max_index_memory" in options:
            options["max_index_memory"] = _size(options["max_index_memory"])
        options = BuildOptions(**{"rebuild": False, **options})
        spec, random_init = indexed_spec(self.config)
        self.last_update = build(build_target(self._address), sources, spec, device, options, random_init,
                                 precision)
        self.refresh()
        self._tag_new_items()
        return self.last_update

    def _tag_new_items(self) -> None:
        """After an update of a tagged index: tag what came in with the label set it was tagged with."""
        info = self.config.get("tags")
        if info and (self.last_update.get("indexed") or self.last_update.get("updated")) and process_env().is_master:
            self.last_update["tagged"] = self.tag(info["labels"], info["templates"], info["threshold"], info["top"],
                                                  only_untagged=True)["tagged"]

    def refresh(self) -> None:
        """Re-read what another process committed (a folder index; a PostgreSQL index reads it live)."""
        self.store.refresh()

    def __len__(self) -> int:
        return len(self.store)

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    def ids(self, captions: bool = False) -> np.ndarray:
        """The ids of every item (``captions``: of every item with a caption vector), ascending."""
        return self.store.ids(captions)

    def vectors(self, ids, captions: bool = False) -> np.ndarray:
        """The stored unit vectors of ``ids`` (image vectors, or ``captions``' caption vectors) as float32
        (N, dim); KeyError for an id that has none."""
        return self.store.vectors(ids, captions)

    # ----------------------------------------------------------------------------------------- queries

    def parse(self, text: str, look_up_files: bool = True) -> Query:
        """The query syntax of ``clipforge search`` (see ``clipforge.search.query.parse_query``)."""
        return parse_query(text, look_up_files)

    @property
    def query_precision(self) -> str:
        """How this object encodes text and image queries: the precision asked for, else the index's own
        (``clipforge.search.model.indexed_precision``) where the device allows it (int8 runs on the CPU only)."""
        if self._precision is not None:
            return self._precision
        own = indexed_precision(self.config)
        return own if own == "fp32" or resolve_device(self.device or "cpu").type == "cpu" else "fp32"

    def model(self):
        """(model, preprocess), loaded once in ``query_precision`` and checked against the weights checksum the
        index records; a precision other than the index's is said once (``UserWarning``)."""
        with self._lock:
            if self._model is None:
                precision, own = self.query_precision, indexed_precision(self.config)
                if precision != own:
                    warnings.warn(f"the index in {self.location} holds vectors encoded in {own}, and its queries "
                                  f"are encoded in {precision}: results can differ slightly from queries in "
                                  f"{own} (pass --precision {own}, or precision={own!r}, to match)", UserWarning,
                                  stacklevel=3)
                model, preprocess = load_indexed_model(self.config, self.device, precision)
                if weights_checksum(model) != self.config["weights_sha256"]:
                    raise ValueError(f"model {self.config['model']} has changed since this index was built "
                                     "(weights checksum differs); rebuild the index with --rebuild")
                prepare_for_queries(model)
                self._model, self._preprocess = model, preprocess
            return self._model, self._preprocess

    def encode_query(self, query: str | Query) -> np.ndarray:
        """The query's unit vector (dim,) float32: the weighted sum of its terms' normalised embeddings,
        renormalised."""
        query = self.parse(query) if isinstance(query, str) else query
        total = np.zeros(self.dim, dtype=np.float64)
        for term in query.terms:
            total += term.weight * self._term_vector(term)
        norm = np.linalg.norm(total)
        if norm < 1e-6:
            raise ValueError("the query's terms cancel out (their weighted sum is zero); change a weight or sign")
        return (total / norm).astype(np.float32)

    def _term_vector(self, term) -> np.ndarray:
        if term.kind == "id":
            try:
                return self.vectors([term.value])[0].astype(np.float64)
            except KeyError:
                raise ValueError(f"no item with id {term.value} in this index") from None
        model, preprocess = self.model()
        with self._lock:
            if term.kind == "text":
                return encode_texts(model, [str(term.value)])[0].cpu().numpy().astype(np.float64)
            image = load_image(term.value, name=None if term.kind == "image" else "the uploaded image")
            return encode_images(model, preprocess(image)[None])[0].cpu().numpy().astype(np.float64)

    # ------------------------------------------------------------------------------------------ search

    def search(self, query, top_k: int = 10, offset: int = 0, folder: str | None = None,
               min_score: float | None = None, dedup: float | None = None, captions: bool = False,
               approximate: bool | None = None, after: str | None = None, before: str | None = None,
               caption: str | None = None, sort: str = "score", tags=()) -> list[SearchResult]:
        """The ``top_k`` best items after ``offset``, best first, by cosine similarity to ``query`` (a
        query string, a ``Query`` or a unit vector). Filters, which run in the store: ``folder`` keeps items
        whose path starts with it; ``after`` / ``before`` (a date, YYYY-MM-DD, or date-time) keep items
        captured at or after / before then (EXIF time, else the file's mtime; the local time where the photo
        was taken); ``caption`` keeps items whose caption contains it; ``tags`` (and ``tag:LABEL`` in a query
        string) keeps items ``tag`` gave every one of those labels; ``min_score`` drops weaker hits.
        ``dedup`` drops hits whose cosine to a better kept hit is at least that; ``captions`` searches the
        caption vectors; ``sort="date"`` orders the hits that pass (``min_score`` sets how close they must
        be) newest first. Exact unless ``approximate`` is True, or None and the index has an approximate
        index (used only without filters, dedup, captions and date order)."""
        if top_k < 1 or offset < 0:
            raise ValueError(f"top_k must be at least 1 and offset at least 0, got top_k={top_k}, offset={offset}")
        if sort not in ("score", "date"):
            raise ValueError(f"sort must be 'score' or 'date', got {sort!r}")
        query = self.parse(query) if isinstance(query, str) else query
        tags = tuple(dict.fromkeys([*tags, *(query.tags if isinstance(query, Query) else ())]))
        filters = Filters.of(folder, after, before, caption, tags)
        vector = query if isinstance(query, np.ndarray) else self.encode_query(query)
        wanted = offset + top_k
        if (dedup is not None or sort == "date") and approximate:
            raise ValueError("dedup and date order need exact search: leave approximate unset or False")
        if sort == "date":
            if dedup is not None:
                ids, scores = self._dedup(vector, len(self), filters, captions, min_score, dedup)
                ids, scores = self._newest_first(ids, scores)
            else:
                ids, scores = self.store.by_date(vector, wanted, filters, captions, min_score)
        elif dedup is not None:
            ids, scores = self._dedup(vector, wanted, filters, captions, min_score, dedup)
        else:
            ids, scores = self.store.ranked(vector, wanted, filters, captions, min_score, approximate)
        return self._results(ids[offset:wanted], scores[offset:wanted])

    def _newest_first(self, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        captured = {item.id: (item.captured or "")[:19] for item in self.store.items([int(i) for i in ids])}
        order = sorted(range(len(ids)), key=lambda j: (captured[int(ids[j])], float(scores[j]), -int(ids[j])),
                       reverse=True)
        return ids[order], scores[order]

    def _dedup(self, vector, wanted: int, filters: Filters, captions: bool, min_score, threshold: float):
        """The best ``wanted`` hits, each below ``threshold`` cosine to every better kept hit: candidates
        are ranked by the store in growing windows, and only the candidates' vectors are read. Each window is
        compared in blocks: one product of a block against the hits kept so far, then the block's own
        candidates against each other in order."""
        limit = max(4 * wanted, 64)
        while True:
            ids, scores = self.store.ranked(vector, limit, filters, captions, min_score, False)
            vectors = self.vectors(ids, captions)
            kept = np.empty((0, vectors.shape[1]), dtype=np.float32)
            chosen: list[int] = []
            for start in range(0, len(ids), 256):
                block = vectors[start:start + 256]
                fresh = (np.ones(len(block), dtype=bool) if not len(kept)
                         else torch_matmul(kept, block.T).max(axis=0) < threshold)
                within = torch_matmul(block, block.T)
                taken: list[int] = []
                for j in np.flatnonzero(fresh):
                    if taken and within[j, taken].max() >= threshold:
                        continue
                    taken.append(int(j))
                    if len(chosen) + len(taken) == wanted:
                        break
                chosen += [start + j for j in taken]
                kept = np.concatenate([kept, block[taken]])
                if len(chosen) == wanted:
                    break
            if len(chosen) == wanted or len(ids) < limit:
                return ids[chosen], scores[chosen]
            limit *= 4

    def search_batch(self, queries: np.ndarray, top_k: int = 10,
                     approximate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (Q, top_k), of the best items for each unit vector of ``queries`` (Q, dim)."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        return self.store.search_batch(queries, top_k, approximate)

    def _results(self, ids: np.ndarray, found: np.ndarray) -> list[SearchResult]:
        items = {i.id: i for i in self.store.items([int(i) for i in ids])}
        tags = self.store.tags_of([int(i) for i in ids])
        return [SearchResult(int(i), float(s), items[int(i)].location, items[int(i)].caption,
                             items[int(i)].width, items[int(i)].height, items[int(i)].captured,
                             tuple(label for label, _ in tags.get(int(i), ())), items[int(i)].time)
                for i, s in zip(ids, found)]

    def tags(self, id: int) -> list[tuple[str, float]]:
        """Item ``id``'s (label, score) tags from ``clipforge tag``, best first."""
        return self.store.tags_of([int(id)]).get(int(id), [])

    def tag(self, labels, templates=None, threshold: float = TAG_THRESHOLD, top: int = TAG_TOP,
            only_untagged: bool = False) -> dict:
        """Tag every item's image vector with the labels (a list, a file of one label per line, or a shipped set
        such as ``imagenet1k``) scoring at least ``threshold``, at most ``top`` a picture, with the zero-shot
        classifier of the index's model (``clipforge.search.tags``); nothing is encoded again but the labels'
        prompts. Returns the summary; the tags filter searches (``tag:LABEL``)."""
        model, _ = self.model()
        summary = tag_items(self, self._address, model, labels, templates, threshold, top, only_untagged)
        self.refresh()
        return summary

    # ------------------------------------------------------------------------------------------- items

    def item(self, id: int) -> Item:
        """Every metadata column of item ``id``; KeyError if there is none."""
        found = self.store.items([int(id)])
        if not found:
            raise KeyError(f"no item with id {id} in this index")
        return found[0]

    def image_bytes(self, id: int) -> bytes:
        """The original encoded image of item ``id``, from its file or shard member (a video frame: that frame,
        as a JPEG); KeyError if unknown."""
        item = self.item(id)
        if item.time is not None:
            import io

            from clipforge.data import video_frame
            buffer = io.BytesIO()
            video_frame(item.path, item.time).save(buffer, format="JPEG", quality=92)
            return buffer.getvalue()
        ref = ImageRef(item.path, item.member, item.offset, item.size) if item.member else item.path
        return read_image_bytes(ref)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads for encoding and search (default: all the cores it finds)."""
    if threads:
        torch.set_num_threads(threads)


def _size(size: int | str | None) -> int | None:
    """Bytes of ``max_index_memory``: as given, or parsed from a size such as "4GB"."""
    return parse_size(size) if isinstance(size, str) else size
