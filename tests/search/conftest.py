"""Fixtures of the embedding tests (test_embed*.py): a mix of sources, and what the local engine writes of them."""
import csv
import io
import tarfile
from pathlib import Path

import pytest
import torch

from clipforge.data import ShapesDataset

EMBED_MODEL = "tiny-vit"


def make_embed_sources(root: Path) -> list[str]:
    """A folder (17 images, one in a subfolder, and a file that is not an image), a captioned table (4 images
    and a missing file), a captioned shard (5) and a shard without captions (3, and a sample without an image):
    with partitions of 4 images, 8 partitions and 29 vectors."""
    shapes = ShapesDataset(40, seed=5, image_size=64)
    (root / "photos" / "sub").mkdir(parents=True)
    for i in range(17):
        shapes.image(i).save(root / "photos" / ("sub" if i == 16 else "") / f"p{i:02d}.{'png' if i % 5 else 'jpg'}")
    (root / "photos" / "broken.jpg").write_bytes(b"not an image")
    (root / "table").mkdir()
    with open(root / "table" / "captions.csv", "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["filepath", "caption"])
        for i in range(17, 21):
            shapes.image(i).save(root / "table" / f"t{i}.jpg")
            table.writerow([f"t{i}.jpg", shapes.caption(i)])
        table.writerow(["gone.jpg", "a missing file"])
    (root / "shards").mkdir()
    _write_shard(root / "shards" / "000.tar", [(f"s{i}", shapes.image(i), shapes.caption(i)) for i in range(21, 26)])
    _write_shard(root / "shards" / "001.tar", [(f"s{i}", shapes.image(i), None) for i in range(26, 29)] +
                 [("textonly", None, "a caption without an image")])
    return [str(root / "photos"), str(root / "table" / "captions.csv"), str(root / "shards")]


def _write_shard(path: Path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            members = []
            if image is not None:
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                members.append((f"{key}.jpg", buffer.getvalue()))
            if caption is not None:
                members.append((f"{key}.txt", caption.encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def embed_sources(tmp_path_factory):
    return make_embed_sources(tmp_path_factory.mktemp("embed_sources"))


@pytest.fixture(scope="session")
def embedded_locally(embed_sources, tmp_path_factory):
    """(folder, summary): ``embed_sources`` embedded by the local engine, in this process, on one thread, with
    partitions of 4 images and batches of 3."""
    from clipforge.search.embed import EmbedOptions, embed
    folder = tmp_path_factory.mktemp("embed_local") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = embed(folder, embed_sources, EMBED_MODEL, EmbedOptions(batch_size=3, workers=0, partition_size=4,
                                                                         progress=False), random_init=True)
    finally:
        torch.set_num_threads(threads)
    return folder, summary
