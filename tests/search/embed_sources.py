"""The embedding tests' sources (a folder, a captioned table and shards), made in a folder: a module of its own,
as the tests import it by name (a ``conftest`` import would find whichever conftest.py was loaded first)."""
import csv
import io
import tarfile
from pathlib import Path

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
