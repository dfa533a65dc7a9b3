"""``clipforge index`` and ``clipforge search`` through the real entry point: summaries, output formats,
filters, and errors as one ``clipforge CMD: error:`` line."""
import json

import numpy as np
import pytest

from clipforge.cli import main
from clipforge.search import Index

from test_search_index import write_folder


@pytest.fixture
def built(tmp_path, index_at, one_thread, capsys):
    photos = tmp_path / "photos"
    write_folder(photos, 8)
    (photos / "broken.jpg").write_bytes(b"nope")
    index = index_at
    assert main(["index", str(photos), "--model", "tiny-vit", "--random-init", "--index", str(index), "--workers",
                 "0", "--no-progress"]) == 0
    return photos, index, capsys.readouterr().out


def test_index_prints_a_summary_and_updates_incrementally(built, capsys):
    photos, index, out = built
    assert out.strip() == (f"indexed 8, updated 0, vectors reused 0, unchanged 0, removed 0, skipped 1 "
                           f"(unreadable_image: 1); 8 items in {index}")
    (photos / "img001.jpg").unlink()
    assert main(["index", str(photos), "--index", str(index), "--workers", "0", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["unchanged"], summary["removed"], summary["items"]) == (7, 1, 7)


def test_search_outputs_match_the_library(built, capsys):
    photos, index, _ = built
    expected = Index.open(index).search("a green photo - 0.5:id:2", top_k=3)
    assert main(["search", str(index), "a green photo", "-", "0.5:id:2", "--top", "3", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in shown] == [r.id for r in expected]
    np.testing.assert_allclose([r["score"] for r in shown], [r.score for r in expected], atol=1e-6)
    assert main(["search", str(index), "a green photo - 0.5:id:2", "--top", "3", "--paths-only"]) == 0
    assert capsys.readouterr().out.split() == [r.path for r in expected]
    assert main(["search", str(index), str(photos / "img002.jpg"), "--top", "2"]) == 0
    first = capsys.readouterr().out.splitlines()[0].split()
    assert first[2] == str(photos / "img002.jpg") and float(first[0]) == pytest.approx(1.0, abs=2e-3)
    assert main(["search", str(index), "a photo", "--folder", str(photos / "deep"), "--paths-only"]) == 0
    assert all("/deep/" in p for p in capsys.readouterr().out.split())


@pytest.mark.parametrize("argv, message", [
    (["search", "{index}", "id:999"], "no item with id 999"),
    (["search", "{index}", "beach", "+"], "ends with an operator"),
    (["search", "{index}", "x", "--dedup", "3"], "--dedup is a cosine"),
    (["search", "{tmp}/none", "x"], "no search index in"),
    (["index", "{tmp}/photos", "--index", "{index}", "--model", "{tmp}/nomodel"], "neither an existing file"),
    (["index", "{tmp}/nowhere", "--index", "{index}"], "does not exist"),
])
def test_errors_are_one_line(built, tmp_path, capsys, argv, message):
    _, index, _ = built
    argv = [a.format(index=index, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clipforge {argv[0]}: error: ") and message in err and "Traceback" not in err
