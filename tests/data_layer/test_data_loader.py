"""The training loader: no repeats across ranks and workers, determinism, exact resume, full batches
despite bad samples, resampling, weights. Captions are "id <n>" so tokens identify samples."""
import io
import logging
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data import DataSourceError, build_train_data


def preprocess(image):
    """PIL -> FloatTensor[3, 8, 8] plus random noise, to check that augmentations are seeded per batch."""
    pixels = torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255
    return pixels + 0.01 * torch.rand(1)


def tokenize(captions):
    return torch.tensor([[int(c.split()[1])] for c in captions])


def ids(batches) -> list[int]:
    return [int(i) for _, tokens in batches for i in tokens[:, 0]]


def png(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, i // 256 % 256, 7)).save(out, format="PNG")
    return out.getvalue()


BAD_PAYLOADS = [b"", b"not an image", png(0)[:30]]


def make_csv(folder, n: int, bad=(), start: int = 0) -> str:
    """images + data.csv of ids start..start+n-1; ids in ``bad`` get a zero-byte, junk or truncated file."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["filepath,caption"]
    for i in range(start, start + n):
        data = BAD_PAYLOADS[i % 3] if i in bad else png(i)
        (folder / f"{i}.png").write_bytes(data)
        lines.append(f"{i}.png,id {i}")
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "data.csv")


def make_shards(folder, shards: int, per_shard: int, bad=(), start: int = 0) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:03d}.tar", "w") as tar:
            for i in range(start + s * per_shard, start + (s + 1) * per_shard):
                members = {"png": BAD_PAYLOADS[i % 3] if i in bad else png(i), "txt": f"id {i}".encode()}
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return f"{folder}/{{000..{shards - 1:03d}}}.tar"


def build(spec, batch_size=4, **kw):
    return build_train_data(spec, preprocess, tokenize, batch_size, **kw)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return {"csv": make_csv(root / "csv", 64), "wds": make_shards(root / "wds", 8, 8),
            "csv_bad": make_csv(root / "csv_bad", 48, bad={3, 10, 20, 33, 41}),
            "wds_bad": make_shards(root / "wds_bad", 4, 12, bad={2, 13, 27, 40})}


@pytest.mark.parametrize("kind", ["csv", "wds"])
def test_no_sample_repeated_within_an_epoch_across_ranks_and_workers(datasets, kind):
    seen = []
    for rank in range(2):
        data = build(datasets[kind], rank=rank, world_size=2, workers=2, seed=5)
        batches = list(data.batches(epoch=1))
        assert len(batches) == data.steps_per_epoch == 8
        assert all(images.shape == (4, 3, 8, 8) and tokens.shape == (4, 1) for images, tokens in batches)
        seen += ids(batches)
    assert sorted(seen) == list(range(64))
    assert data.split_by == ("index" if kind == "csv" else "shards")


@pytest.mark.parametrize("kind", ["csv", "wds"])
def test_deterministic_per_seed_and_epoch(datasets, kind):
    first, again = build(datasets[kind], seed=1), build(datasets[kind], seed=1)
    epoch0 = list(first.batches(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch0, again.batches(0)))
    assert ids(first.batches(1)) != ids(epoch0)
    assert ids(build(datasets[kind], seed=2).batches(0)) != ids(epoch0)
    assert sorted(ids(first.batches(1))) == sorted(ids(epoch0)) == list(range(64))


def test_map_style_batches_do_not_depend_on_the_number_of_workers(datasets):
    in_process = list(build(datasets["csv_bad"], seed=3).batches(2))
    workers = list(build(datasets["csv_bad"], seed=3, workers=2).batches(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(in_process, workers))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["csv_bad", "wds_bad"])
def test_resume_from_start_batch_is_exact(datasets, kind, workers):
    data = build(datasets[kind], batch_size=3, seed=7, workers=workers, shuffle_buffer=10)
    full = list(data.batches(epoch=3))
    assert len(full) == data.steps_per_epoch == 16
    for k in (1, 5, 15, 16):
        resumed = list(data.batches(epoch=3, start_batch=k))
        assert len(resumed) == len(full) - k
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[k:], resumed))


@pytest.mark.parametrize("kind", ["csv_bad", "wds_bad"])
def test_full_batches_despite_bad_samples_and_counts_come_back_from_workers(datasets, kind):
    counts = []
    for workers in (0, 2):
        data = build(datasets[kind], batch_size=5, workers=workers)
        batches = list(data.batches(0))
        assert len(batches) == data.steps_per_epoch and all(t.shape == (5, 1) for _, t in batches)
        bad = {3, 10, 20, 33, 41} if kind == "csv_bad" else {2, 13, 27, 40}
        assert not bad & set(ids(batches))
        counts.append(data.skip_counts())
    assert counts[0] == counts[1]
    assert set(counts[0]) == {"empty_file", "unreadable_image"} and sum(counts[0].values()) >= 3


def test_resampled_streams_are_endless_and_deterministic(datasets):
    data = build(datasets["wds"], resampled=True, seed=4, workers=2)
    assert data.steps_per_epoch is None and data.num_samples is None
    taken = ids(islice(data.batches(0), 40))  # 160 samples from 64
    assert len(taken) == 160 and len(set(taken)) > 50
    assert ids(islice(data.batches(0), 40)) == taken
    assert ids(islice(data.batches(0, start_batch=25), 15)) == taken[100:]
    mapped = build(datasets["csv"], resampled=True)
    assert len(ids(islice(mapped.batches(0), 40))) == 160 and mapped.steps_per_epoch is None
    assert build(datasets["csv"], resampled=True, num_samples=40, world_size=2).steps_per_epoch == 5
    with_bad = build(datasets["csv_bad"], resampled=True)
    taken = ids(islice(with_bad.batches(0), 30))
    assert len(taken) == 120 and not {3, 10, 20, 33, 41} & set(taken) and with_bad.skip_counts()


def test_fewer_shards_than_ranks_times_workers_splits_samples(tmp_path, caplog):
    spec = make_shards(tmp_path, 2, 16)
    seen = []
    with caplog.at_level(logging.WARNING, logger="clipforge.data.loader"):
        for rank in range(2):
            data = build(spec, rank=rank, world_size=2, workers=2)
            seen += ids(data.batches(0))
    assert data.split_by == "samples" and "fewer shards than ranks x workers" in caplog.text
    assert sorted(seen) == list(range(32))


def test_weights_upsample_sources(tmp_path):
    mixed = f"{make_csv(tmp_path / 'a', 8)}::{make_csv(tmp_path / 'b', 8, start=100)}"
    data = build(mixed, weights=[1, 2])
    assert data.num_samples == 24
    assert Counter(ids(data.batches(0))) == {**{i: 1 for i in range(8)}, **{i: 2 for i in range(100, 108)}}
    half = build(mixed, weights="1::0.5")
    assert Counter(i >= 100 for i in ids(half.batches(0))) == {False: 8, True: 4}
    shards = f"{make_shards(tmp_path / 'c', 2, 4)}::{make_shards(tmp_path / 'd', 2, 4, start=100)}"
    counts = Counter(ids(build(shards, weights=[1, 2]).batches(0)))
    assert counts == {**{i: 1 for i in range(8)}, **{i: 2 for i in range(100, 108)}}


def test_mostly_bad_source_stops_training_with_a_clear_error(tmp_path):
    spec = make_csv(tmp_path, 40, bad=set(range(30)))
    for workers in (0, 2):
        with pytest.raises(DataSourceError, match="mostly bad"):
            list(build(spec, workers=workers).batches(0))


def test_argument_errors(datasets):
    with pytest.raises(ValueError, match="rank"):
        build(datasets["csv"], rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than batch_size x world_size"):
        build(datasets["csv"], batch_size=40, world_size=2)
    with pytest.raises(ValueError, match="mixes WebDataset shards"):
        build(f"{datasets['csv']}::{datasets['wds']}")
    with pytest.raises(ValueError, match="one positive number per"):
        build(datasets["csv"], weights=[1, 2])
    with pytest.raises(ValueError, match="start_batch"):
        build(datasets["csv"]).batches(0, start_batch=-1)


def test_builtin_with_the_real_transform_and_tokenizer():
    from clipforge.tokenizer import get_tokenizer
    from clipforge.transforms import image_transform

    data = build_train_data("builtin:40", image_transform(32, is_train=True), get_tokenizer(32), 8, workers=2)
    images, tokens = next(iter(data.batches(0)))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert tokens.shape == (8, 32) and tokens.dtype == torch.long
    assert data.steps_per_epoch == 5 and data.skip_counts() == {}
