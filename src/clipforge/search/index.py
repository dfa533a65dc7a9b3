"""The search index as one object: build or update it from image sources, open it, search it by text, image
or item, and read back its items and their original image bytes."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipforge.data import ImageRef, load_image, read_image_bytes
from clipforge.encode import encode_images, encode_texts
from clipforge.search import exact, store
from clipforge.search.approximate import is_current
from clipforge.search.approximate import load as load_approximate
from clipforge.search.build import BuildOptions, build
from clipforge.search.model import indexed_spec, load_indexed_model, prepare_for_queries, weights_checksum
from clipforge.search.query import Query, parse_query


@dataclass(frozen=True)
class SearchResult:
    """One hit: the item's id, cosine similarity to the query, where its image is, caption and size."""

    id: int
    score: float
    path: str
    caption: str | None
    width: int
    height: int


@dataclass(frozen=True)
class Item:
    """Every metadata column of one indexed image (see README, "On-disk format")."""

    id: int
    source: str
    path: str
    key: str
    member: str | None
    offset: int | None
    size: int
    mtime_ns: int
    hash: str
    width: int
    height: int
    caption: str | None
    taken: str | None
    row: int
    caption_row: int | None

    @property
    def location(self) -> str:
        """The file path, or ``shard.tar:key`` for an image inside a shard."""
        return f"{self.path}:{self.key}" if self.key else self.path


class Index:
    """A search index folder. ``Index.build`` creates or updates one, ``Index.open`` reads one; the model
    is loaded on the first text or image query."""

    def __init__(self, folder: str | os.PathLike, device: str | None = None, float32_mib: float = 0):
        self.folder = Path(folder)
        config = store.read_config(self.folder)
        if config is None or not (self.folder / store.DATABASE).exists():
            raise FileNotFoundError(f"no search index in {self.folder} (no {store.CONFIG}); build one with "
                                    f"`clipforge index SOURCE... --model MODEL --index {self.folder}`")
        self.config, self.device = config, device
        self.last_update: dict | None = None  # the summary of the build or update this object ran
        self._lock = threading.RLock()
        self._model = self._preprocess = None
        self._copies = exact.Float32Copies(float32_mib)
        self._db = store.connect(self.folder, readonly=True)
        self.refresh()

    @classmethod
    def open(cls, folder: str | os.PathLike, device: str | None = None, float32_mib: float = 0) -> "Index":
        """Open an existing index; its vectors are memory-mapped. Exact search keeps float32 copies of up to
        ``float32_mib`` MiB of them in RAM, made by the first search that scans them: it multiplies those
        as they are instead of widening float16 rows chunk by chunk, so a long-running service gains and a
        one-off search does not (see README, "Search your images")."""
        return cls(folder, device, float32_mib)

    @classmethod
    def build(cls, folder: str | os.PathLike, sources, model: str, device: str | None = None, batch_size: int = 64,
              workers: int = 2, exclude=(), max_pixels: int | None = None, rebuild: bool = False,
              progress: bool = True, fast_decode: bool = False, approximate: str = "auto",
              random_init: bool = False) -> "Index":
        """Create the index, or update it incrementally; the run's summary is on ``last_update``.
        ``model`` is a model spec (``clipforge.io.spec``); ``random_init``: seed-0 random weights of an
        architecture (tests and demos; recorded in config.json). ``approximate``: build the faiss index
        "always", "never", or "auto" (above 200,000 items)."""
        options = BuildOptions(batch_size, workers, tuple(exclude), max_pixels, fast_decode, progress, rebuild,
                               approximate)
        summary = build(folder, sources, str(model), device, options, random_init)
        index = cls(folder, device)
        index.last_update = summary
        return index

    def update(self, sources, **options) -> dict:
        """Update this index from ``sources`` (options as ``build``, with this index's model)."""
        device = options.pop("device", self.device)
        options = BuildOptions(**{"rebuild": False, **options})
        spec, random_init = indexed_spec(self.config)
        self.last_update = build(self.folder, sources, spec, device, options, random_init)
        self.refresh()
        return self.last_update

    def refresh(self) -> None:
        """Re-read the committed rows (after another process updated the index)."""
        with self._lock:
            found = self._db.execute("SELECT id, row, caption_row FROM items ORDER BY id").fetchall()
            ids = np.array([r[0] for r in found], dtype=np.int64)
            self._ids, self._rows = ids, np.array([r[1] for r in found], dtype=np.int64)
            with_caption = [r for r in found if r[2] is not None]
            self._caption_ids = np.array([r[0] for r in with_caption], dtype=np.int64)
            self._caption_rows = np.array([r[2] for r in with_caption], dtype=np.int64)
            opened = {kind: store.open_identified_segments(self.folder, kind, store.next_row(self._db, kind))
                      for kind in store.KINDS}
            self._segments = {kind: [segment for segment, _ in pairs] for kind, pairs in opened.items()}
            self._identities = {kind: [identity for _, identity in pairs] for kind, pairs in opened.items()}
            self._scanned: dict[str, list[np.ndarray]] = {}  # kind -> segments as exact search reads them
            self.config = store.read_config(self.folder)
            info = self.config.get("approximate")
            current = is_current(info, len(ids), store.next_row(self._db, "images"))
            self._approximate = load_approximate(self.folder, info) if current else None

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    # ----------------------------------------------------------------------------------------- queries

    def parse(self, text: str, look_up_files: bool = True) -> Query:
        """The query syntax of ``clipforge search`` (see ``clipforge.search.query.parse_query``)."""
        return parse_query(text, look_up_files)

    def model(self):
        """(model, preprocess), loaded once and checked against the weights checksum in config.json."""
        with self._lock:
            if self._model is None:
                model, preprocess = load_indexed_model(self.config, self.device)
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
                row = self.item(term.value).row
            except KeyError:
                raise ValueError(f"no item with id {term.value} in this index") from None
            return self._vector("images", row)
        model, preprocess = self.model()
        with self._lock:
            if term.kind == "text":
                return encode_texts(model, [str(term.value)])[0].cpu().numpy().astype(np.float64)
            image = load_image(term.value, name=None if term.kind == "image" else "the uploaded image")
            return encode_images(model, preprocess(image)[None])[0].cpu().numpy().astype(np.float64)

    def _vector(self, kind: str, row: int) -> np.ndarray:
        return self._segments[kind][row // store.SEGMENT_ROWS][row % store.SEGMENT_ROWS].astype(np.float64)

    # ------------------------------------------------------------------------------------------ search

    def search(self, query, top_k: int = 10, offset: int = 0, folder: str | None = None,
               min_score: float | None = None, dedup: float | None = None, captions: bool = False,
               approximate: bool | None = None) -> list[SearchResult]:
        """The ``top_k`` best items after ``offset``, best first, by cosine similarity to ``query`` (a
        query string, a ``Query`` or a unit vector). ``folder`` keeps items whose path starts with it;
        ``min_score`` drops weaker hits; ``dedup`` drops hits whose cosine to a better kept hit is at least
        that; ``captions`` searches the caption vectors. Exact unless ``approximate`` is True, or None and
        the index has a current approximate index (used only without folder, dedup and captions)."""
        if top_k < 1 or offset < 0:
            raise ValueError(f"top_k must be at least 1 and offset at least 0, got top_k={top_k}, offset={offset}")
        vector = query if isinstance(query, np.ndarray) else self.encode_query(query)
        if self._wants_approximate(approximate, folder, dedup, captions):
            ids, found = self._approximate_top(vector[None], offset + top_k)
            keep = (ids[0] >= 0) & (found[0] >= (min_score if min_score is not None else -np.inf))
            return self._results(ids[0][keep][offset:], found[0][keep][offset:])
        kind = "captions" if captions else "images"
        ids, rows = (self._caption_ids, self._caption_rows) if captions else (self._ids, self._rows)
        if folder is not None:
            keep = np.isin(ids, self._ids_under(folder))
            ids, rows = ids[keep], rows[keep]
        candidate_scores = exact.scores(self._scan_segments(kind), vector[None])[rows, 0] if len(rows) else np.empty(0)
        wanted = offset + top_k
        positions, best = exact.top_k(candidate_scores, wanted if dedup is None else len(candidate_scores))
        if min_score is not None:
            positions, best = positions[best >= min_score], best[best >= min_score]
        if dedup is not None:
            positions = self._dedup(kind, rows, positions, dedup, wanted)
            best = candidate_scores[positions]
        positions, best = positions[offset:wanted], best[offset:wanted]
        return self._results(ids[positions], best)

    def search_batch(self, queries: np.ndarray, top_k: int = 10,
                     approximate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each (Q, top_k), of the best items for each unit vector of ``queries`` (Q, dim)."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if approximate:
            return self._approximate_top(queries, top_k)
        all_scores = exact.scores(self._scan_segments("images"), queries)[self._rows]  # (N, Q)
        best = [exact.top_k(all_scores[:, q], top_k) for q in range(len(queries))]
        return np.stack([self._ids[p] for p, _ in best]), np.stack([s for _, s in best])

    def _scan_segments(self, kind: str) -> list[np.ndarray]:
        """The segments of ``kind``, those within the float32 budget as their float32 copies."""
        with self._lock:
            if kind not in self._scanned:
                self._scanned[kind] = self._copies.apply(kind, self._segments[kind], self._identities[kind])
            return self._scanned[kind]

    def _wants_approximate(self, approximate: bool | None, folder, dedup, captions) -> bool:
        if approximate is False:
            return False
        usable = self._approximate is not None and folder is None and dedup is None and not captions
        if approximate and not usable:
            raise ValueError("no approximate search here: the index has no current approximate index (build one "
                             "with `clipforge index ... --approximate always`), or folder/dedup/captions was given")
        return usable

    def _approximate_top(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._approximate is None:
            raise ValueError("this index has no current approximate index; build it with --approximate always")
        searcher, ids = self._approximate
        found, positions = searcher.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return np.where(positions < 0, -1, ids[np.maximum(positions, 0)]), found  # -1: fewer than k found

    def _ids_under(self, folder: str) -> np.ndarray:
        prefix = str(folder) if str(folder).endswith(("/", os.sep)) else os.path.abspath(folder)
        found = self._db.execute("SELECT id FROM items WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))
        return np.array([r[0] for r in found], dtype=np.int64)

    def _dedup(self, kind: str, rows: np.ndarray, ranked: np.ndarray, threshold: float, wanted: int) -> np.ndarray:
        kept, vectors = [], []
        for position in ranked:
            vector = self._vector(kind, int(rows[position]))
            if vectors and max(float(v @ vector) for v in vectors) >= threshold:
                continue
            kept.append(position)
            vectors.append(vector)
            if len(kept) == wanted:
                break
        return np.array(kept, dtype=np.int64)

    def _results(self, ids: np.ndarray, found: np.ndarray) -> list[SearchResult]:
        items = {i.id: i for i in self._items([int(i) for i in ids])}
        return [SearchResult(int(i), float(s), items[int(i)].location, items[int(i)].caption,
                             items[int(i)].width, items[int(i)].height) for i, s in zip(ids, found)]

    # ------------------------------------------------------------------------------------------- items

    def _items(self, ids: list[int]) -> list[Item]:
        if not ids:
            return []
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(store.ITEM_COLUMNS)} FROM items WHERE id IN "
                                    f"({', '.join('?' * len(ids))})", ids).fetchall()
        return [Item(*row) for row in rows]

    def item(self, id: int) -> Item:
        """Every metadata column of item ``id``; KeyError if there is none."""
        found = self._items([int(id)])
        if not found:
            raise KeyError(f"no item with id {id} in this index")
        return found[0]

    def image_bytes(self, id: int) -> bytes:
        """The original encoded image of item ``id``, from its file or shard member; KeyError if unknown."""
        item = self.item(id)
        ref = ImageRef(item.path, item.member, item.offset, item.size) if item.member else item.path
        return read_image_bytes(ref)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads for encoding and search (default: all the cores it finds)."""
    if threads:
        torch.set_num_threads(threads)
