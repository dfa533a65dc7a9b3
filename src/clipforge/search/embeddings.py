"""An embeddings folder in clip-retrieval's layout, which embedding-reader and autofaiss read as it is:
``img_emb/img_emb_{N}.npy``, ``text_emb/text_emb_{N}.npy`` and ``metadata/metadata_{N}.parquet`` (one row per
vector, same order), plus ``embeddings.json`` (the model and the decoding) and ``partitions/partition_{N}.json``
(what partition N held; written last, so that it marks the partition complete).

Every file is written atomically (``clipforge.io.runs.write_files``: a hidden temporary, fsynced, renamed), so a
reader sees a partition's files whole or not at all, and a killed writer leaves only hidden ``.*.tmp`` files.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipforge.io.runs import write_files

CONFIG = "embeddings.json"
FORMAT, FORMAT_VERSION = "clipforge-embeddings", 1
IMAGES, TEXTS, METADATA, RECORDS = "img_emb", "text_emb", "metadata", "partitions"
FOLDERS = (IMAGES, TEXTS, METADATA, RECORDS)
DTYPES = ("float16", "float32")
# The metadata columns, in order: the index's item fields, with clip-retrieval's name for the path.
COLUMNS = (("image_path", "string"), ("key", "string"), ("member", "string"), ("offset", "int64"),
           ("size", "int64"), ("mtime_ns", "int64"), ("source", "string"), ("caption", "string"),
           ("width", "int32"), ("height", "int32"), ("taken", "string"), ("hash", "string"))


@dataclass
class PartitionData:
    """One partition's output: ``vectors`` (n, D) and, when the folder has text, ``texts`` (n, D; zeros for
    an image without a caption), ``rows`` (n metadata dicts, keys ``COLUMNS``), the images it skipped as
    (name, reason, message), problems counted by reason without a name (a shard that cannot be read), and
    how many images its source listed."""

    number: int
    listed: int
    vectors: np.ndarray
    texts: np.ndarray | None
    rows: list[dict]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    problems: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict:
        """The partition's ``partitions/partition_{N}.json``."""
        counts = dict(self.problems)
        for _, reason, _ in self.skipped:
            counts[reason] = counts.get(reason, 0) + 1
        return {"partition": self.number, "listed": self.listed, "vectors": len(self.rows),
                "skipped": dict(sorted(counts.items())),
                "skipped_images": [{"name": n, "reason": r, "message": m} for n, r, m in self.skipped]}


def partition_name(number: int, partitions: int) -> str:
    """Partition ``number`` zero-padded as clip-retrieval pads it (the digits of the partition count), so that
    file names sort in partition order, which is the order embedding-reader reads them in."""
    return str(number).zfill(len(str(partitions)))


def partition_files(folder: str | Path, number: int, partitions: int) -> dict[str, Path]:
    """Partition ``number``'s file under each of ``FOLDERS``."""
    name, folder = partition_name(number, partitions), Path(folder)
    return {IMAGES: folder / IMAGES / f"img_emb_{name}.npy", TEXTS: folder / TEXTS / f"text_emb_{name}.npy",
            METADATA: folder / METADATA / f"metadata_{name}.parquet",
            RECORDS: folder / RECORDS / f"partition_{name}.json"}


def write_partition(folder: str | Path, data: PartitionData, partitions: int, text: bool) -> None:
    """Write partition ``data.number``: its vectors, caption vectors (``text``) and metadata, then its record.

    A partition without a vector (every image skipped) writes only its record, as clip-retrieval writes no
    empty files: embedding-reader leaves an empty ``.npy`` out of its file list, which would pair every later
    ``.npy`` with the wrong metadata file."""
    files = partition_files(folder, data.number, partitions)
    if data.rows:
        _atomic(files[IMAGES], lambda path: _save_npy(path, data.vectors))
        if text:
            _atomic(files[TEXTS], lambda path: _save_npy(path, data.texts))
        _atomic(files[METADATA], lambda path: parquet().write_table(metadata_table(data.rows), str(path)))
    _atomic(files[RECORDS], lambda path: path.write_text(json.dumps(data.record(), indent=1) + "\n"))


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_files(path.parent, {path.name: write})


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temporary's name
        np.save(f, np.ascontiguousarray(array))


def parquet():
    """``pyarrow.parquet``, or RuntimeError naming the extra that installs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("the embeddings' metadata is written as Parquet, which needs pyarrow: "
                           "pip install 'clipforge[embed]'") from None
    return pq


def metadata_table(rows: list[dict]):
    """A pyarrow Table of ``rows`` with the ``COLUMNS`` and their types (null where a value is None)."""
    parquet()  # pyarrow, or the error naming its extra
    import pyarrow as pa
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS])
    return pa.table({name: [row[name] for row in rows] for name, _ in COLUMNS}, schema=schema)


def read_record(folder: str | Path, number: int, partitions: int) -> dict | None:
    """Partition ``number``'s record, or None while the partition is not complete."""
    path = partition_files(folder, number, partitions)[RECORDS]
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def finished(folder: str | Path, partitions: int) -> set[int]:
    """The numbers of the complete partitions (those with a record)."""
    records = Path(folder) / RECORDS
    if not records.is_dir():
        return set()
    names = {partition_files(folder, n, partitions)[RECORDS].name: n for n in range(partitions)}
    return {names[p.name] for p in records.iterdir() if p.name in names}


def read_config(folder: str | Path) -> dict | None:
    """The folder's ``embeddings.json``, or None if it has none."""
    path = Path(folder) / CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def write_config(folder: str | Path, config: dict) -> None:
    _atomic(Path(folder) / CONFIG, lambda path: path.write_text(json.dumps(config, indent=1) + "\n"))


def clear(folder: str | Path) -> None:
    """Remove an embeddings folder's own files (and only those) from ``folder``."""
    folder = Path(folder)
    (folder / CONFIG).unlink(missing_ok=True)
    for name in FOLDERS:
        shutil.rmtree(folder / name, ignore_errors=True)


def remove_temporaries(folder: str | Path) -> None:
    """Remove the hidden temporaries that a killed writer left (``write_files`` names them ``.NAME.TAG.tmp``)."""
    for name in FOLDERS:
        for temp in (Path(folder) / name).glob(".*.tmp") if (Path(folder) / name).is_dir() else ():
            temp.unlink(missing_ok=True)
