"""``clipforge index --from-embeddings``: an embeddings folder (``clipforge embed``'s output) becomes an index of
either store without encoding, with the same items, vectors and search results as ``clipforge index`` on the
same images; another model's index is refused; a second run finds everything unchanged."""
import numpy as np
import pytest

pytest.importorskip("pyarrow", reason="embeddings folders need the embed extra (pyarrow)")

from clipforge.cli import main  # noqa: E402
from clipforge.search import Index  # noqa: E402

from test_search_index import write_folder  # noqa: E402


@pytest.mark.slow
def test_from_embeddings_equals_indexing_the_images(tmp_path, index_at, capsys, one_thread):
    photos = tmp_path / "photos"
    write_folder(photos, 10)
    (photos / "broken.jpg").write_bytes(b"not an image")
    write_folder(tmp_path / "captioned", 2, start=40)  # img040.png, img041.jpg, named by the table only
    table = tmp_path / "captions.csv"
    table.write_text("filepath,caption\ncaptioned/img040.png,a green square\ncaptioned/img041.jpg,\n")
    common = ["--model", "tiny-vit", "--random-init", "--workers", "0", "--no-progress"]
    assert main(["embed", str(photos), str(table), "--output", str(tmp_path / "emb"), "--partition-size", "4",
                 *common]) == 0
    assert main(["index", str(photos), str(table), "--index", str(tmp_path / "direct"), *common]) == 0
    capsys.readouterr()
    assert main(["index", "--from-embeddings", str(tmp_path / "emb"), "--index", str(index_at), "--no-progress",
                 "--json"]) == 0
    assert '"indexed": 12' in capsys.readouterr().out
    with Index.open(tmp_path / "direct") as direct, Index.open(index_at) as ingested:
        assert len(ingested) == len(direct) == 12
        by_path = {direct.item(i).path: i for i in direct.ids()}
        ids = ingested.ids()
        paths = [ingested.item(i).path for i in ids]
        assert sorted(paths) == sorted(by_path)
        np.testing.assert_allclose(ingested.vectors(ids), direct.vectors([by_path[p] for p in paths]), atol=2e-3)
        assert {ingested.item(i).caption for i in ingested.ids(captions=True)} == {"a green square"}
        for query in ("a red photo", "a green square"):
            a, b = direct.search(query, top_k=12), ingested.search(query, top_k=12)
            assert [r.path for r in a] == [r.path for r in b]
            np.testing.assert_allclose([r.score for r in a], [r.score for r in b], atol=2e-3)
        item = ingested.item(int(ids[0]))
        assert item.captured_from == "mtime" and item.hash == direct.item(by_path[item.path]).hash
    assert main(["index", "--from-embeddings", str(tmp_path / "emb"), "--index", str(index_at), "--no-progress"]) == 0
    assert "indexed 0, updated 0, vectors reused 0, unchanged 12" in capsys.readouterr().out
    assert main(["index", "--from-embeddings", str(tmp_path / "emb"), "--index", str(tmp_path / "other"),
                 "--no-progress"]) == 0
    assert main(["index", str(photos), "--index", str(tmp_path / "other"), "--workers", "0", "--no-progress"]) == 0
    assert "indexed 0," in capsys.readouterr().out.splitlines()[-1]  # the ingested index updates like any other
    from clipforge.io.factory import create_model, save
    import torch
    torch.manual_seed(5)
    save(create_model("tiny-vit"), tmp_path / "another")
    assert main(["embed", str(photos), "--output", str(tmp_path / "emb2"), "--model", str(tmp_path / "another"),
                 "--workers", "0", "--no-progress"]) == 0
    assert main(["index", "--from-embeddings", str(tmp_path / "emb2"), "--index", str(index_at)]) == 2
    assert "was built with model tiny-vit" in capsys.readouterr().err
