"""The query syntax of ``clipforge search``: signs, weights, quoted text, image paths and item ids."""
import pytest

from clipforge.search import Query, Term, parse_query


def _terms(text):
    return [(t.kind, t.value, t.weight) for t in parse_query(text).terms]


def test_signs_weights_and_multiword_text():
    assert _terms("beach + 0.5:sunset - people") == [("text", "beach", 1.0), ("text", "sunset", 0.5),
                                                     ("text", "people", -1.0)]
    assert _terms("a dog on a beach - 2:rain clouds") == [("text", "a dog on a beach", 1.0),
                                                          ("text", "rain clouds", -2.0)]
    assert _terms("t-shirt with 3:4 stripes") == [("text", "t-shirt with 3:4 stripes", 1.0)]
    assert _terms('"rock - paper" + .25:scissors') == [("text", "rock - paper", 1.0), ("text", "scissors", 0.25)]


def test_ids_and_image_paths(tmp_path, monkeypatch):
    (tmp_path / "query.jpg").write_bytes(b"x")
    (tmp_path / "notes").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert _terms('./query.jpg + "at night"') == [("image", "./query.jpg", 1.0), ("text", "at night", 1.0)]
    assert _terms("id:42 - 0.3:id:7") == [("id", 42, 1.0), ("id", 7, -0.3)]
    assert _terms("notes") == [("image", "notes", 1.0)]  # an existing file is an image
    assert _terms("missing.png") == [("image", "missing.png", 1.0)]  # reported as missing when encoded
    assert _terms('"query.jpg"') == [("text", "query.jpg", 1.0)]


@pytest.mark.parametrize("bad", ["", "   ", "beach +", "+ beach", "beach + - sun"])
def test_malformed_queries_are_refused_with_a_message(bad):
    with pytest.raises(ValueError, match="query"):
        parse_query(bad)


def test_from_terms_accepts_tuples_dicts_and_terms():
    query = Query.from_terms([("text", "a cat"), {"id": 3, "weight": -0.5}, Term("bytes", b"\xff", 2.0)])
    assert [(t.kind, t.weight) for t in query.terms] == [("text", 1.0), ("id", -0.5), ("bytes", 2.0)]
    with pytest.raises(ValueError):
        Query.from_terms([])
    with pytest.raises(ValueError):
        Query.from_terms([{"text": "a", "id": 1}])
    with pytest.raises(ValueError):
        Query.from_terms([("video", "x")])
