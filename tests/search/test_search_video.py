"""Videos in an indexed folder: an item per frame (every few seconds and at scene changes) with its time,
each vector its frame's; results print as VIDEO@mm:ss; unchanged videos are not read again, a changed one is
re-read and its old frames go, a corrupt one is skipped by reason; both stores."""
import os
import sys

import numpy as np
import pytest

pytest.importorskip("av", reason="videos need the video extra (PyAV)")

from clipforge.cli import main  # noqa: E402
from clipforge.data import video_frame  # noqa: E402
from clipforge.encode import encode_images  # noqa: E402
from clipforge.search import Index  # noqa: E402
from clipforge.search.model import load_model  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data_layer"))
from video_files import BLUE, GREEN, RED, video  # noqa: E402

from test_search_index import write_folder  # noqa: E402


def _frames_match_their_vectors(index) -> None:
    model, preprocess = load_model("tiny-vit", "cpu", random_init=True)
    ids = [i for i in index.ids() if index.item(i).time is not None]
    import torch
    frames = torch.stack([preprocess(video_frame(index.item(i).path, index.item(i).time)) for i in ids])
    np.testing.assert_allclose(index.vectors(ids), encode_images(model, frames).numpy(), atol=3e-3)


@pytest.mark.slow
def test_video_frames_are_items_with_their_times(tmp_path, index_at, capsys, one_thread):
    photos = tmp_path / "photos"
    write_folder(photos, 3)
    (photos / "clip.mp4").write_bytes(video([(3, RED), (4, BLUE), (3, GREEN)]))  # cuts at 3 s and 7 s
    (photos / "broken.webm").write_bytes(b"\x1aE\xdf\xa3 not really a video")
    common = ["--model", "tiny-vit", "--random-init", "--workers", "0", "--no-progress"]
    assert main(["index", str(photos), "--index", str(index_at), "--video-every", "5", "--json", *common]) == 0
    out = capsys.readouterr().out
    assert '"unreadable_video": 1' in out
    with Index.open(index_at) as index:
        frames = sorted(index.item(i).time for i in index.ids() if index.item(i).time is not None)
        assert frames[0] == 0.0 and 5.0 in frames and any(abs(t - 3.0) < 0.15 for t in frames) \
            and any(abs(t - 7.0) < 0.15 for t in frames), frames  # the interval frames and the two cuts
        item = next(index.item(i) for i in index.ids() if index.item(i).time == 5.0)
        assert item.location == f"{photos / 'clip.mp4'}@00:05" and (item.width, item.height) == (160, 96)
        assert item.captured_from in ("video", "mtime") and item.key == "t=5.000"
        _frames_match_their_vectors(index)
        hit = index.search(item.id and f"id:{item.id}", top_k=1)[0]
        assert hit.id == item.id and hit.time == 5.0 and hit.path.endswith("clip.mp4@00:05")
    assert main(["search", str(index_at), f"id:{item.id}", "--top", "1"]) == 0
    assert capsys.readouterr().out.split()[2] == f"{photos / 'clip.mp4'}@00:05"
    assert main(["index", str(photos), "--index", str(index_at), *common[3:]]) == 0
    assert f"unchanged {3 + len(frames)}," in capsys.readouterr().out  # not read again
    with Index.open(index_at) as index:
        kept = {i: index.item(i) for i in index.ids() if index.item(i).time is not None}
    later = (photos / "clip.mp4").stat().st_mtime_ns + 3600 * 10**9  # touched (a copy, a sync): same bytes
    os.utime(photos / "clip.mp4", ns=(later, later))
    assert main(["index", str(photos), "--index", str(index_at), *common[3:]]) == 0
    out = capsys.readouterr().out
    assert "indexed 0," in out and f"unchanged {3 + len(frames)}," in out, out  # hashed, not decoded again
    with Index.open(index_at) as index:
        again = {i: index.item(i) for i in index.ids() if index.item(i).time is not None}
        assert again.keys() == kept.keys()  # the same items, with their vectors
        for i, item in again.items():
            assert item.mtime_ns == later and item.captured_from == kept[i].captured_from
            if item.captured_from == "video":  # the container's time stays; an mtime one follows the file
                assert item.captured == kept[i].captured
    (photos / "clip.mp4").write_bytes(video([(2, GREEN), (2, RED)]))  # changed: 4 s, a cut at 2 s
    assert main(["index", str(photos), "--index", str(index_at), "--video-every", "5", *common[3:]]) == 0
    with Index.open(index_at) as index:
        now = sorted(index.item(i).time for i in index.ids() if index.item(i).time is not None)
        assert now[0] == 0.0 and max(now) < 4 and any(abs(t - 2.0) < 0.15 for t in now), now
        _frames_match_their_vectors(index)
