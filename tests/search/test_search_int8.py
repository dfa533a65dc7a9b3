"""Indexes in int8 (``--precision int8``): the precision recorded in the model identity, vectors close to the
float32 index's, one kind of vector per index, and queries in the other precision allowed but said once, through
the library, the CLI, ``clipforge embed`` with ``--from-embeddings``, and the service."""
import json
import shutil
import warnings

import numpy as np
import pytest

from clipforge.cli import main
from clipforge.models.quantize import is_int8
from clipforge.search import Index

QUERIES = ("a red circle", "a blue square", "a green triangle", "a yellow star", "a purple cross", "a photo")


def _vectors_by_path(index: Index) -> dict[str, np.ndarray]:
    ids = index.ids()
    return {index.item(int(i)).path: vector for i, vector in zip(ids, index.vectors(ids))}


@pytest.fixture(scope="module")
def int8_index(tmp_path_factory, search_photos, trained_tiny_model):
    """``search_photos`` indexed by the trained tiny-vit in int8 (the library)."""
    folder = tmp_path_factory.mktemp("int8") / "photos.index"
    Index.build(folder, [str(search_photos)], model=str(trained_tiny_model), progress=False, precision="int8").close()
    return folder


def test_int8_index_records_its_precision_and_its_vectors_are_close_to_fp32(int8_index, search_index):
    with Index.open(int8_index) as int8, Index.open(search_index) as fp32:
        assert int8.config["precision"] == "int8" and "precision" not in fp32.config
        # the identity names the same float32 weights: the model is the same, only its arithmetic differs
        assert int8.config["weights_sha256"] == fp32.config["weights_sha256"]
        assert int8.query_precision == "int8" and fp32.query_precision == "fp32"
        ours, theirs = _vectors_by_path(int8), _vectors_by_path(fp32)
        assert ours.keys() == theirs.keys() and len(ours) == 57
        cosines = np.array([float(ours[p] @ theirs[p]) for p in ours])
        assert cosines.min() > 0.999, cosines.min()
        assert not np.array_equal(ours[next(iter(ours))], theirs[next(iter(ours))])  # int8 really ran
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the index's own precision: nothing to say
            overlaps = []
            for query in QUERIES:
                a = {r.path for r in int8.search(query, top_k=10)}
                b = {r.path for r in fp32.search(query, top_k=10)}
                overlaps.append(len(a & b) / 10)
        assert is_int8(int8.model()[0]) and not is_int8(fp32.model()[0])
        assert np.mean(overlaps) >= 0.9, overlaps


def test_queries_in_the_other_precision_are_allowed_and_said(int8_index, search_index):
    for folder, precision, own in ((int8_index, "fp32", "int8"), (search_index, "int8", "fp32")):
        with Index.open(folder, precision=precision) as index:
            with pytest.warns(UserWarning, match=f"holds vectors encoded in {own}, and its queries are encoded in "
                                                 f"{precision}"):
                results = index.search("a red circle", top_k=5)
            assert len(results) == 5 and index.query_precision == precision
            assert is_int8(index.model()[0]) == (precision == "int8")
    with pytest.raises(ValueError, match="fp16 and bf16"):
        Index.open(search_index, precision="fp16")


def test_cli_int8_index_update_search_and_refusals(tmp_path, search_photos, saved_tiny_model, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(search_photos / "a", photos)
    index = tmp_path / "idx"
    assert main(["index", str(photos), "--index", str(index), "--model", str(saved_tiny_model),
                 "--precision", "int8", "--no-progress"]) == 0
    capsys.readouterr()
    config = json.loads((index / "config.json").read_text())
    assert config["precision"] == "int8"

    # another kind of vector in the same index is refused, before anything is written...
    shutil.copy(search_photos / "b" / "00030.jpg", photos / "new.jpg")
    assert main(["index", str(photos), "--index", str(index), "--precision", "fp32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds vectors encoded in int8, and this run encodes in fp32" in err and "--rebuild" in err
    with Index.open(index) as opened:
        assert len(opened) == 28
    # ...and an update without --precision keeps the index's: int8, the same vector the library's int8 gives
    assert main(["index", str(photos), "--index", str(index), "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["indexed"] == 1
    with Index.open(index) as opened:
        assert len(opened) == 29 and opened.config["precision"] == "int8"
        new = next(opened.item(int(i)) for i in opened.ids() if opened.item(int(i)).path.endswith("new.jpg"))
        (tmp_path / "alone").mkdir()
        shutil.copy(photos / "new.jpg", tmp_path / "alone")
        reference = Index.build(tmp_path / "reference", [str(tmp_path / "alone")], model=str(saved_tiny_model),
                                progress=False, precision="int8")
        np.testing.assert_allclose(opened.vectors([new.id])[0], reference.vectors(reference.ids())[0], atol=1e-3)
        reference.close()

    # searched in its own precision: nothing said; in fp32: said once, as one line
    assert main(["search", str(index), "a red circle", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 10 and "warning" not in captured.err
    assert main(["search", str(index), "a red circle + a blue square", "--precision", "fp32", "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 10
    lines = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("clipforge search: warning: the index in"), captured.err

    # --copy-from keeps the precision the vectors were made in; a --precision there is refused
    assert main(["index", "--index", str(tmp_path / "copy"), "--copy-from", str(index), "--precision", "fp32"]) == 2
    assert "--precision" in capsys.readouterr().err
    assert main(["index", "--index", str(tmp_path / "copy"), "--copy-from", str(index), "--no-progress"]) == 0
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["precision"] == "int8"


def test_embed_int8_then_from_embeddings(tmp_path, search_photos, saved_tiny_model, capsys):
    emb = tmp_path / "emb"
    assert main(["embed", str(search_photos / "a"), "--model", str(saved_tiny_model), "--output", str(emb),
                 "--precision", "int8", "--no-progress", "--workers", "0"]) == 0
    assert json.loads((emb / "embeddings.json").read_text())["precision"] == "int8"
    assert main(["index", "--index", str(tmp_path / "i8"), "--from-embeddings", str(emb), "--no-progress"]) == 0
    capsys.readouterr()
    with Index.open(tmp_path / "i8") as from_embeddings:
        assert from_embeddings.config["precision"] == "int8" and len(from_embeddings) == 28
        direct = Index.build(tmp_path / "direct", [str(search_photos / "a")], model=str(saved_tiny_model),
                             progress=False, precision="int8")
        ours, theirs = _vectors_by_path(from_embeddings), _vectors_by_path(direct)
        assert ours.keys() == theirs.keys()
        for path in ours:  # float16 storage on both sides
            np.testing.assert_allclose(ours[path], theirs[path], atol=2e-3)
        direct.close()
    # an fp32 index takes no int8 embeddings
    assert main(["index", str(search_photos / "b"), "--index", str(tmp_path / "fp32"), "--model",
                 str(saved_tiny_model), "--no-progress"]) == 0
    assert main(["index", "--index", str(tmp_path / "fp32"), "--from-embeddings", str(emb), "--no-progress"]) == 2
    assert "holds vectors encoded in fp32" in capsys.readouterr().err


@pytest.mark.slow
def test_service_over_an_int8_index(int8_index, tmp_path):
    """``clipforge serve`` answers as the library's int8 index does; with ``--precision fp32`` it says so once, as
    one line, however many queries follow."""
    pytest.importorskip("fastapi", reason="the service tests need the serve extra (fastapi, uvicorn)")
    import urllib.request

    from clipforge.serve.server import start_child

    def search(base: str, query: str) -> list[int]:
        request = urllib.request.Request(f"{base}/api/search", data=json.dumps({"query": query, "top_k": 5}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return [r["id"] for r in json.load(response)["results"]]

    with Index.open(int8_index) as library:
        expected = {q: [r.id for r in library.search(q, top_k=5)] for q in QUERIES[:3]}
    for options in ((), ("--precision", "fp32")):
        log = tmp_path / f"stderr{len(options)}.txt"
        with open(log, "w") as stderr:
            process, base = start_child(int8_index, *options, stderr=stderr)
        try:
            answers = {q: search(base, q) for q in QUERIES[:3]}
        finally:
            process.terminate()
            process.wait(timeout=30)
        warned = [line for line in log.read_text().splitlines() if "warning" in line]
        if options:
            assert len(warned) == 1 and warned[0].startswith("clipforge serve: warning: the index in"), warned
            assert all(len(a) == 5 for a in answers.values())
        else:
            assert warned == [] and answers == expected


def test_a_postgresql_index_records_int8_and_keeps_one_kind(postgres, search_photos, saved_tiny_model):
    url = postgres.url("int8_photos")
    index = Index.build(url, [str(search_photos / "a")], model=str(saved_tiny_model), progress=False,
                        precision="int8")
    try:
        assert index.config["precision"] == "int8" and index.query_precision == "int8" and len(index) == 28
        with pytest.raises(ValueError, match="holds vectors encoded in int8, and this run encodes in fp32"):
            index.update([str(search_photos / "b")], precision="fp32", progress=False)
        assert len(index) == 28
        index.update([str(search_photos / "b")], progress=False)  # the index's own precision
        assert len(index) == 57 and index.config["precision"] == "int8"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert len(index.search("a red circle", top_k=5)) == 5
    finally:
        index.close()
