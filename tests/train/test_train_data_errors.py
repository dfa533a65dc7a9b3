"""Training on damaged data: a CSV and a WebDataset shard holding corrupt images, zero-byte files and empty
captions train to completion, and metrics.jsonl reports the skipped samples by reason."""
import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from clipforge.data import build_train_data, class_names, write_shapes
from clipforge.train import TrainConfig, train
from clipforge.train.logger import read_metrics

MICRO = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                         "head_width": 16},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
ZERO_BYTES, CORRUPT, EMPTY_CAPTIONS = (0, 5, 9), (2, 14, 30), (7, 21)
GARBAGE = b"\x89PNG\r\n\x1a\n but then not an image at all"


pytestmark = pytest.mark.usefixtures("one_thread")


def _damaged_csv(root: Path) -> str:
    """50 rows; 2 empty captions (dropped while indexing) leave 48 = 6 batches of 8, so one epoch reads all."""
    spec = write_shapes(root, 50, fmt="csv", image_size=32)
    rows = list(csv.reader(open(spec)))
    header, body = rows[0], rows[1:]
    for i in ZERO_BYTES:
        (root / body[i][0]).write_bytes(b"")
    for i in CORRUPT:
        (root / body[i][0]).write_bytes(GARBAGE)
    for i in EMPTY_CAPTIONS:
        body[i][1] = "   "
    with open(spec, "w", newline="") as f:
        csv.writer(f).writerows([header] + body)
    return spec


def _damaged_shard(root: Path) -> str:
    """One shard of 48 samples (6 batches of 8) with the same kinds of damage, members rewritten."""
    spec = write_shapes(root, 48, fmt="wds", image_size=32)
    shard = next(root.glob("*.tar"))
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            index, ext = int(Path(member.name).stem), member.name.rsplit(".", 1)[-1]
            if ext == "png" and index in ZERO_BYTES:
                data = b""
            elif ext == "png" and index in CORRUPT:
                data = GARBAGE
            elif ext == "txt" and index in EMPTY_CAPTIONS:
                data = b" \n"
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return spec


def _expected_skips(spec: str, workers: int) -> dict:
    """The loader's own count for one epoch, read without the trainer."""
    data = build_train_data(spec, lambda image: torch.zeros(3, 32, 32), lambda texts: torch.zeros(len(texts), 32),
                            8, seed=0, workers=workers)
    for _ in data.batches(0):
        pass
    return data.skip_counts()


@pytest.mark.parametrize("kind, workers", [("csv", 0), ("wds", 1)])
def test_damaged_data_trains_and_counts_skips(tmp_path, kind, workers):
    model = tmp_path / "micro.json"
    model.write_text(json.dumps(MICRO))
    spec = (_damaged_csv if kind == "csv" else _damaged_shard)(tmp_path / kind)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(class_names("all")) + "\n")
    cfg = TrainConfig(model=str(model), train_data=spec, output=str(tmp_path / "run"), epochs=1, batch_size=8,
                      warmup=1, workers=workers, log_every=2, val_data=spec, zeroshot_classes=str(classes))
    result = train(cfg)
    assert result["step"] == 6

    skipped = read_metrics(tmp_path / "run")[-2]["skipped"]  # the last training record, before validation
    assert skipped == _expected_skips(spec, workers)
    assert set(skipped) == {"empty_file", "unreadable_image", "empty_caption"}
    assert skipped["empty_file"] >= len(ZERO_BYTES) and skipped["unreadable_image"] >= len(CORRUPT)
    if kind == "csv":
        assert skipped["empty_caption"] == len(EMPTY_CAPTIONS)  # dropped once, while indexing the CSV
    else:
        assert skipped["empty_caption"] >= len(EMPTY_CAPTIONS)

    val = result["val"]
    assert val["val_samples"] == 48 - len(ZERO_BYTES) - len(CORRUPT) - (len(EMPTY_CAPTIONS) if kind == "wds" else 0)
    assert val["zeroshot_classes"] == 48 and val["zeroshot_samples"] == val["val_samples"]


def test_mostly_broken_data_stops_with_a_clear_error(tmp_path):
    model = tmp_path / "micro.json"
    model.write_text(json.dumps(MICRO))
    spec = write_shapes(tmp_path / "bad", 40, fmt="csv", image_size=32)
    for png in (tmp_path / "bad" / "images").iterdir():
        png.write_bytes(b"")
    cfg = TrainConfig(model=str(model), train_data=spec, output=str(tmp_path / "run"), steps=3, batch_size=8,
                      warmup=1, workers=0)
    with pytest.raises(ValueError, match="mostly bad|unusable"):
        train(cfg)
