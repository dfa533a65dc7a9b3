"""Truncating tokenization stops BPE early yet keeps exactly the first ids of the full tokenization."""
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge import tokenizer as tk
from clipforge.tokenizer import Tokenizer, tokenize

CASES = json.loads((Path(__file__).parents[1] / "fixtures" / "tokenizer_cases.json").read_text(encoding="utf-8"))
SOT, EOT = 49406, 49407
# Runs of one pre-tokenizer class (letters, other symbols) become single long words; digits, apostrophes,
# spaces and HTML entities split them.
PIECES = ["a", "a", "b", "e", "n", "t", "h", "q", "é", "ß", "東", "京", "ー", "!", ".", "-", "😀", "1", "'s",
          " ", "&amp;", "the", "ing", "ation"]
texts = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=200).map("".join),
    st.builds(lambda piece, n: piece * n, st.lists(st.sampled_from(PIECES), min_size=1, max_size=5).map("".join),
              st.integers(1, 80)),
)


def _row(ids: list[int], length: int) -> list[int]:
    return [SOT, *ids, EOT] + [0] * (length - len(ids) - 2)


def _mapped(bpe: tk._BPE, text: str) -> str:
    return "".join(bpe.byte_encoder[b] for b in text.encode("utf-8"))


@contextmanager
def _small_windows():
    """A tokenizer with empty caches whose bounded paths start at 4-character chunks and 2-character windows,
    so that short texts go through them."""
    with pytest.MonkeyPatch.context() as mp:
        bpe = tk._shared_bpe()
        mp.setattr(bpe, "word_cache", {})
        mp.setattr(bpe, "chunk_caches", {})
        mp.setattr(tk, "_LONG_CHUNK", 4)
        mp.setattr(tk, "_BPE_WINDOW", 2)
        yield Tokenizer()


def test_merges_apply_in_rising_rank_order():
    """The premise of the bound: each merge's parts are byte symbols or made by a lower-ranked merge, and no two
    merges make the same token, so every merge creates only pairs of higher rank."""
    bpe = tk._shared_bpe()
    made_by = {first + second: rank for (first, second), rank in bpe.ranks.items()}
    assert len(made_by) == len(bpe.ranks)
    base = set(bpe.byte_encoder.values()) | {c + "</w>" for c in bpe.byte_encoder.values()}
    assert not base & made_by.keys()
    late = [(pair, rank) for pair, rank in bpe.ranks.items()
            if any(part not in base and made_by.get(part, rank) >= rank for part in pair)]
    assert late == []


@settings(max_examples=300, deadline=None)
@given(word=texts.filter(bool), count=st.integers(1, 40), window=st.integers(1, 24))
def test_merge_prefix_is_the_prefix_of_merge(word, count, window):
    bpe = tk._shared_bpe()
    mapped = _mapped(bpe, word)
    full = bpe.merge(mapped)
    prefix = bpe.merge_prefix(mapped, count, window)
    assert len(prefix) >= min(count, len(full)) and prefix == full[:len(prefix)]


def test_merge_prefix_on_words_that_defeat_short_windows():
    """Repeated letters, where merges chain across the whole window, and random letters."""
    bpe = tk._shared_bpe()
    rng = random.Random(0)
    words = ["a" * 700, "ab" * 300, "aab" * 200, "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(900)),
             "thequickbrownfox" * 40, "東京" * 100, "!?" * 300]
    for word in words:
        mapped = _mapped(bpe, word)
        full = bpe.merge(mapped)
        for window in (1, 3, 16, 128):
            assert bpe.merge_prefix(mapped, 75, window)[:75] == full[:75], (word[:20], window)


@pytest.mark.parametrize("context_length", [77, 20, 5, 2])
def test_stored_openai_cases_through_the_bounded_paths(context_length):
    texts = [case["text"] for case in CASES["cases"]]
    assert CASES["context_length"] == 77 and CASES["truncate"]
    with _small_windows() as tok:
        rows = tok(texts, context_length=context_length, truncate=True)
    for text, case, row in zip(texts, CASES["cases"], rows):
        kept = case["ids"][1:case["ids"].index(EOT)][:context_length - 2]
        assert row.tolist() == _row(kept, context_length), text


@settings(max_examples=200, deadline=None)
@given(text=texts, context_length=st.integers(2, 40))
def test_truncation_keeps_the_prefix_of_the_full_tokenization(text, context_length):
    with _small_windows() as tok:
        full = tok._encode_reference(text)
        row = tok(text, context_length=context_length, truncate=True)[0].tolist()
        assert row == _row(full[:context_length - 2], context_length)
        assert tok.encode(text) == full  # a truncated pass leaves no partial ids in the caches
        assert tok(text, context_length=context_length, truncate=True)[0].tolist() == row
    assert tokenize(text, context_length=context_length, truncate=True)[0].tolist() == row  # default bounds


def test_several_long_chunks_and_texts_in_one_batch():
    rng = random.Random(1)
    long_word = "".join(rng.choice("abcdefghij") for _ in range(600))
    batch = ["short caption", f"{long_word} {long_word[::-1]} tail", f"a b {long_word}!{long_word}", long_word[:30]]
    tok = Tokenizer()
    rows = tok(batch, context_length=77, truncate=True)
    for text, row in zip(batch, rows):
        assert row.tolist() == _row(tok._encode_reference(text)[:75], 77)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["letters", "one letter", "cjk", "symbols", "mixed"])
def test_megabyte_caption_without_spaces_is_bounded(kind):
    rng = random.Random(2)
    pieces = {"letters": "abcdefghijklmnopqrstuvwxyz", "one letter": "a", "cjk": "東京タワー北京大阪",
              "symbols": "!?.,-_=+*#@", "mixed": "abé東!1"}[kind]
    caption = "".join(rng.choice(pieces) for _ in range(1_000_000))
    start = time.perf_counter()
    row = tokenize(caption, truncate=True)[0].tolist()
    assert time.perf_counter() - start < 5
    assert row[0] == SOT and row[-1] == EOT  # cut: end of text in the last column
    shorter = caption[:4000]  # the same bounded path, checked against the full BPE of the whole text
    assert tokenize(shorter, truncate=True)[0].tolist() == _row(Tokenizer()._encode_reference(shorter)[:75], 77)


def test_megabyte_caption_checked_exactly():
    """A word ends at '!', so the first ids of this 1 MB caption are those of its first word alone."""
    rng = random.Random(3)
    first = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1500))
    caption = first + "!" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1_000_000))
    start = time.perf_counter()
    row = tokenize(caption, truncate=True)[0].tolist()
    assert time.perf_counter() - start < 5
    assert row == _row(Tokenizer()._encode_reference(first)[:75], 77)
