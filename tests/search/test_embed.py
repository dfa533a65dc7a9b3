"""``clipforge embed``: the folder it writes (clip-retrieval's layout) holds each image's own vector, hash and
size, and each caption's vector; reruns continue, and refuse another model or changed sources; embedding-reader
and autofaiss read it; a SIGKILLed run resumed and torchrun's two ranks end with what one process writes."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.data import ImageRef, ShapesDataset, load_image
from clipforge.encode import encode_images, encode_texts
from clipforge.search import embeddings
from clipforge.search.embed import EmbedOptions, embed
from clipforge.search.model import load_model, model_identity

from embed_sources import EMBED_MODEL as MODEL
from embed_sources import make_embed_sources

pq = pytest.importorskip("pyarrow.parquet")

OPTIONS = EmbedOptions(batch_size=3, workers=0, partition_size=4, progress=False)  # those of embedded_locally


def read_output(folder) -> tuple[np.ndarray, np.ndarray | None, list[dict], list[dict]]:
    """(image vectors, caption vectors, metadata rows, records) of a folder, partitions in file-name order."""
    config = embeddings.read_config(folder)
    count = config["partitions"]
    vectors, texts, rows = [], [], []
    for n in range(count):
        files = embeddings.partition_files(folder, n, count)
        if files[embeddings.METADATA].exists():
            vectors.append(np.load(files[embeddings.IMAGES]))
            texts.append(np.load(files[embeddings.TEXTS]) if config["text"] else None)
            rows += pq.read_table(files[embeddings.METADATA]).to_pylist()
    records = [embeddings.read_record(folder, n, count) for n in range(count)]
    return np.concatenate(vectors), (np.concatenate(texts) if config["text"] else None), rows, records


def assert_same_output(folder, reference) -> None:
    """Same partitions, metadata, records and configuration; vectors to 1e-3."""
    got, want = read_output(folder), read_output(reference)
    assert got[2] == want[2] and got[3] == want[3]
    np.testing.assert_allclose(got[0].astype(np.float32), want[0].astype(np.float32), atol=1e-3)
    np.testing.assert_allclose(got[1].astype(np.float32), want[1].astype(np.float32), atol=1e-3)
    assert sorted(p.name for p in Path(folder).rglob("*")) == sorted(p.name for p in Path(reference).rglob("*"))
    assert embeddings.read_config(folder) == embeddings.read_config(reference)


def _image(row: dict):
    """(decoded image, encoded bytes) of a metadata row, read without clipforge's listing."""
    if row["member"]:
        data = ImageRef(row["image_path"], row["member"], row["offset"], row["size"]).read()
    else:
        data = Path(row["image_path"]).read_bytes()
    return load_image(data), data


def _cli(*args, env=None, **kwargs):
    command = [sys.executable, "-m", "clipforge", "embed", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


CLI_OPTIONS = ["--model", MODEL, "--random-init", "--workers", "0", "--batch-size", "3", "--partition-size", "4",
               "--no-progress"]


@pytest.mark.slow
def test_local_engine_writes_each_images_own_vector_in_clip_retrievals_layout(embedded_locally, one_thread):
    folder, summary = embedded_locally
    vectors, texts, rows, records = read_output(folder)
    assert summary == {"partitions": 8, "embedded": 8, "already_done": 0, "vectors": 29, "output": str(folder),
                       "skipped": {"missing_file": 1, "missing_image": 1, "unreadable_image": 1}}
    assert sorted(os.listdir(folder)) == ["embeddings.json", "img_emb", "metadata", "partitions", "text_emb"]
    for kind, name in (("img_emb", "img_emb_{}.npy"), ("text_emb", "text_emb_{}.npy"),
                       ("metadata", "metadata_{}.parquet"), ("partitions", "partition_{}.json")):
        assert sorted(os.listdir(folder / kind)) == [name.format(n) for n in range(8)]
    assert [(r["listed"], r["vectors"], r["skipped"]) for r in records] == [
        (4, 3, {"unreadable_image": 1}), (4, 4, {}), (4, 4, {}), (4, 4, {}), (2, 2, {}), (4, 4, {"missing_file": 1}),
        (5, 5, {}), (3, 3, {"missing_image": 1})]
    assert records[0]["skipped_images"][0]["name"].endswith("broken.jpg")
    # one row per vector, in listing order: the folder (sorted, the broken file skipped), the table, the shards
    names = [Path(r["image_path"]).name + (":" + r["key"] if r["key"] else "") for r in rows]
    assert names == [f"p{i:02d}.{'png' if i % 5 else 'jpg'}" for i in range(17)] + \
        [f"t{i}.jpg" for i in range(17, 21)] + [f"000.tar:s{i}" for i in range(21, 26)] + \
        [f"001.tar:s{i}" for i in range(26, 29)]
    assert vectors.dtype == texts.dtype == np.float16 and vectors.shape == texts.shape == (29, 128)
    model, preprocess = load_model(MODEL, "cpu", random_init=True)
    images = [_image(r) for r in rows]
    fresh = encode_images(model, torch.stack([preprocess(img) for img, _ in images])).numpy()
    np.testing.assert_allclose(vectors.astype(np.float32), fresh, atol=1e-3)
    assert [r["hash"] for r in rows] == [hashlib.blake2b(data, digest_size=16).hexdigest() for _, data in images]
    assert [(r["width"], r["height"]) for r in rows] == [img.size for img, _ in images]
    captioned = [i for i, r in enumerate(rows) if r["caption"]]
    assert [names[i] for i in captioned] == [f"t{i}.jpg" for i in range(17, 21)] + \
        [f"000.tar:s{i}" for i in range(21, 26)]
    np.testing.assert_allclose(texts[captioned].astype(np.float32),
                               encode_texts(model, [rows[i]["caption"] for i in captioned]).numpy(), atol=1e-3)
    assert not texts[[i for i in range(29) if i not in captioned]].any()  # zeros where there is no caption
    config = embeddings.read_config(folder)
    identity = model_identity(MODEL, model, preprocess, random_init=True)
    assert {k: config[k] for k in identity} == json.loads(json.dumps(identity))  # what an index records
    assert (config["dtype"], config["text"], config["partitions"], config["normalized"]) == ("float16", True, 8, True)
    schema = pq.read_schema(embeddings.partition_files(folder, 6, 8)[embeddings.METADATA])
    assert [(f.name, str(f.type)) for f in schema] == [
        ("image_path", "string"), ("key", "string"), ("member", "string"), ("offset", "int64"), ("size", "int64"),
        ("mtime_ns", "int64"), ("source", "string"), ("caption", "string"), ("width", "int32"),
        ("height", "int32"), ("taken", "string"), ("hash", "string")]


@pytest.mark.slow
def test_rerun_skips_finished_partitions_and_refuses_another_model_or_changed_sources(tmp_path, one_thread):
    sources = make_embed_sources(tmp_path)
    folder = tmp_path / "out"
    embed(folder, sources, MODEL, OPTIONS, random_init=True)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    again = embed(folder, sources, MODEL, OPTIONS, random_init=True)
    assert (again["embedded"], again["already_done"], again["vectors"]) == (0, 8, 29)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before  # nothing rewritten
    with pytest.raises(ValueError, match="other model; model weights"):
        embed(folder, sources, "tiny-rn", OPTIONS, random_init=True)
    (tmp_path / "photos" / "p99.png").write_bytes((tmp_path / "photos" / "p01.png").read_bytes())
    with pytest.raises(ValueError, match=r"other sources \(other sources, or files added.*--rebuild"):
        embed(folder, sources, MODEL, OPTIONS, random_init=True)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before
    rebuilt = embed(folder, sources, MODEL, EmbedOptions(**{**OPTIONS.__dict__, "rebuild": True}), random_init=True)
    assert (rebuilt["embedded"], rebuilt["vectors"]) == (8, 30)


def test_a_folder_of_other_files_is_refused_and_kept(tmp_path, one_thread):
    (tmp_path / "photos").mkdir()
    ShapesDataset(1, seed=0, image_size=32).image(0).save(tmp_path / "photos" / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no embeddings.json"):
        embed(tmp_path / "out", [tmp_path / "photos"], MODEL, OPTIONS, random_init=True)
    with pytest.raises(ValueError, match="not empty"):
        embed(tmp_path / "out", [tmp_path / "photos"], MODEL, EmbedOptions(rebuild=True), random_init=True)
    assert os.listdir(tmp_path / "out") == ["notes.txt"]


@pytest.mark.slow
def test_embedding_reader_and_autofaiss_read_the_folder(embedded_locally):
    from embedding_reader import EmbeddingReader
    folder, _ = embedded_locally
    vectors, texts, rows, _ = read_output(folder)
    reader = EmbeddingReader(embeddings_folder=str(folder / "img_emb"), metadata_folder=str(folder / "metadata"),
                             meta_columns=["image_path", "key", "caption", "hash"], file_format="parquet_npy")
    assert (reader.count, reader.dimension) == (29, 128)
    read, meta = next(reader(batch_size=29, start=0, end=29, show_progress=False))
    np.testing.assert_array_equal(read, vectors.astype(np.float32))
    assert meta[["image_path", "key", "hash"]].to_dict("records") == [
        {k: r[k] for k in ("image_path", "key", "hash")} for r in rows]
    text_reader = EmbeddingReader(embeddings_folder=str(folder / "text_emb"), file_format="npy")
    np.testing.assert_array_equal(next(text_reader(batch_size=29, show_progress=False))[0], texts.astype(np.float32))
    autofaiss = pytest.importorskip("autofaiss", reason="autofaiss pins numpy<2; install it with pip --no-deps")
    # save_on_disk=False: autofaiss writes its metrics with json, which refuses numpy 2's float32 scalars
    index, _ = autofaiss.build_index(embeddings=str(folder / "img_emb"), save_on_disk=False, metric_type="ip",
                                     max_index_memory_usage="50MB", current_memory_available="500MB", verbose=40)
    assert index.ntotal == 29
    np.testing.assert_allclose(index.reconstruct_n(0, 29), vectors.astype(np.float32), atol=1e-6)
    _, found = index.search(vectors[[3, 20]].astype(np.float32), 1)
    assert found[:, 0].tolist() == [3, 20]


def _complete_partitions_are_whole(folder) -> int:
    """Every partition with a record has its three files, with as many rows as its record says; no other
    partition file is visible. Returns the number of complete partitions."""
    config = embeddings.read_config(folder)
    count, done = config["partitions"], embeddings.finished(folder, config["partitions"])
    for n in range(count):
        files = embeddings.partition_files(folder, n, count)
        if n in done:
            rows = embeddings.read_record(folder, n, count)["vectors"]
            assert np.load(files["img_emb"]).shape[0] == np.load(files["text_emb"]).shape[0] == rows
            assert pq.read_metadata(files["metadata"]).num_rows == rows
        else:
            assert not files["metadata"].exists()
    return len(done)


@pytest.mark.slow
def test_sigkilled_run_resumes_complete_and_identical(tmp_path, embedded_locally, embed_sources, one_thread):
    folder = tmp_path / "out"
    for attempt in range(2):  # killed twice, each time once it has written a partition more
        before = len(embeddings.finished(folder, 8)) if folder.exists() else 0
        run = _cli(*embed_sources, "--output", folder, *CLI_OPTIONS)
        deadline = time.monotonic() + 120
        while (not folder.exists() or len(embeddings.finished(folder, 8)) <= before) and run.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.002)
        run.send_signal(signal.SIGKILL)
        run.communicate(timeout=60)
        assert run.returncode == -signal.SIGKILL, "the run ended before it was killed"
        complete = _complete_partitions_are_whole(folder)
        assert before < complete < 8, complete
    out, err = _cli(*embed_sources, "--output", folder, *CLI_OPTIONS).communicate(timeout=300)
    assert f"embedded {8 - complete} partitions, {complete} already done; 29 vectors in 8 partitions" in out, err
    assert_same_output(folder, embedded_locally[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_write_what_one_process_writes(tmp_path, embedded_locally, embed_sources):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "clipforge", "embed", *embed_sources, "--output",
               str(tmp_path / "out"), *CLI_OPTIONS, "--json"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert json.loads(done.stdout)["vectors"] == 29
    assert_same_output(tmp_path / "out", embedded_locally[0])
