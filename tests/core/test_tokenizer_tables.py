"""The tokenizer's quick start (issue 23): it reads the merges OpenAI uses from a prebuilt table (or, without
it, decompresses only that part of the merges file), encodes with ``pair_ranks`` alone (the token of the merge
of rank r has id 512 + r) and builds the full vocabulary tables only when asked. Here the table is what the
merges file gives, the tables equal OpenAI's construction from the whole merges file, and a tokenizer starting
from scratch gives the stored ids and the ids of OpenAI's algorithm on a large random corpus."""
import json
import random
from importlib import resources
from pathlib import Path

import pytest
import torch

from clipforge import tokenizer as tk
from clipforge.tokenizer import Tokenizer

from test_fuzz_tokenizer import _reference  # OpenAI's algorithm, re-typed

CASES = json.loads((Path(__file__).parents[1] / "fixtures" / "tokenizer_cases.json").read_text(encoding="utf-8"))
FULL_TABLES = ("encoder", "decoder", "ranks", "byte_decoder", "max_token_length")


@pytest.fixture(scope="module")
def openai_tables() -> dict:
    """OpenAI's ``simple_tokenizer`` construction (the whole merges file decompressed and split into lines), as
    the reference tokenizer of test_fuzz_tokenizer.py builds it."""
    reference = _reference(False)
    return {"merges": reference.merges, "vocab": reference.vocab, "encoder": reference.encoder,
            "ranks": reference.ranks, "reference": reference}


def _fresh_tokenizer(monkeypatch, **kwargs) -> Tokenizer:
    """A tokenizer on a newly parsed vocabulary with empty caches, as in a new process."""
    bpe = tk._BPE()
    monkeypatch.setattr(tk, "_shared_bpe", lambda: bpe)
    return Tokenizer(**kwargs)


def _openai_word_ids(tables: dict, mapped: str) -> list[int]:
    """OpenAI's BPE of one byte-mapped word, on the tables built from the whole file."""
    return [tables["encoder"][token] for token in tables["reference"].bpe(mapped)]


def test_prebuilt_merge_table_is_what_the_merges_file_gives(openai_tables, tmp_path):
    table = (resources.files("clipforge.assets") / tk._MERGE_TABLE).read_text(encoding="utf-8")
    assert table == "".join(f"{first} {second}\n" for first, second in openai_tables["merges"])
    assert table == tk._merge_table_text()
    tk._write_merge_table([str(tmp_path)])  # what `python -m clipforge.tokenizer FOLDER` writes
    assert (tmp_path / tk._MERGE_TABLE).read_text(encoding="utf-8") == table


def test_without_the_table_the_merges_file_is_read(monkeypatch, openai_tables):
    expected = [" ".join(m) for m in openai_tables["merges"]]
    assert tk._read_merge_lines() == expected
    asset = tk._asset

    def no_table(name):
        if name == tk._MERGE_TABLE:
            raise FileNotFoundError(name)
        return asset(name)

    monkeypatch.setattr(tk, "_asset", no_table)
    assert tk._read_merge_lines() == expected
    assert tk._BPE().pair_ranks == dict(zip(expected, range(len(expected))))


def test_quick_tables_equal_openai_construction(openai_tables):
    bpe = tk._BPE()
    assert list(bpe.pair_ranks) == [" ".join(m) for m in openai_tables["merges"]]
    assert list(bpe.pair_ranks.values()) == list(range(len(openai_tables["merges"])))
    assert not any(name in vars(bpe) for name in FULL_TABLES)  # built on first use only
    assert bpe.ranks == openai_tables["ranks"]
    assert bpe.decoder == openai_tables["vocab"] and bpe.encoder == openai_tables["encoder"]
    assert bpe.byte_decoder == {c: b for b, c in bpe.byte_encoder.items()}
    assert bpe.max_token_length == max(map(len, openai_tables["vocab"]))
    # the id rule the quick path rests on: a merge's token is distinct from all others and has id 512 + rank
    assert len(bpe.encoder) == len(bpe.decoder) == tk._VOCAB_SIZE == 49408
    assert all(bpe.encoder[first + second] == 512 + rank for (first, second), rank in bpe.ranks.items())
    assert (tk._SOT_ID, tk._EOT_ID) == (bpe.encoder["<|startoftext|>"], bpe.encoder["<|endoftext|>"])


def test_merge_lines_are_read_from_a_stream_cut_anywhere(monkeypatch, openai_tables):
    """The merges file is decompressed in pieces until its first 48,895 lines are in: any piece size works."""
    expected = [" ".join(m) for m in openai_tables["merges"]]
    decompressobj = tk.zlib.decompressobj
    for first, later in ((1000, 777), (524_000, 1), (4 << 20, 4 << 20)):
        class Stream:  # the real stream, with other piece sizes
            def __init__(self, wbits):
                self.stream, self.calls = decompressobj(wbits=wbits), 0

            def decompress(self, data, max_length, first=first, later=later):
                self.calls += 1
                return self.stream.decompress(data, first if self.calls == 1 else later)

            @property
            def unconsumed_tail(self):
                return self.stream.unconsumed_tail

        monkeypatch.setattr(tk.zlib, "decompressobj", Stream)
        assert tk._merge_lines_from_merges_file() == expected, (first, later)


def test_stored_cases_from_a_cold_start(monkeypatch):
    tok = _fresh_tokenizer(monkeypatch, context_length=CASES["context_length"], truncate=CASES["truncate"])
    expected = [case["ids"] for case in CASES["cases"]]
    assert len(expected) == 161
    assert tok([case["text"] for case in CASES["cases"]]).tolist() == expected
    assert not any(name in vars(tok._bpe) for name in ("encoder", "decoder", "ranks"))  # never needed to encode
    assert tok._bpe.token_ids.items() <= tok._bpe.encoder.items()  # ids recorded while merging are the vocabulary's


def test_cold_start_equals_openai_algorithm_on_a_large_random_corpus(monkeypatch, openai_tables):
    rng = random.Random(23)
    points = [c for c in range(0x20, 0x30000) if not 0xD800 <= c < 0xE000]
    letters = "abcdefghijklmnopqrstuvwxyzéèüößçñ"
    texts = ["".join(chr(rng.choice(points)) for _ in range(rng.randint(1, 60))) for _ in range(1500)]
    texts += ["".join(rng.choice(letters) for _ in range(rng.randint(1, 40))) for _ in range(1500)]  # long merges
    tok = _fresh_tokenizer(monkeypatch)
    bpe = tok._bpe
    for text in texts:
        expected = [i for word in tok._findall(tk.clean_text(text))
                    for i in _openai_word_ids(openai_tables, "".join(bpe.byte_encoder[b] for b in word.encode()))]
        assert tok.encode(text) == expected, text
    assert bpe.token_ids.items() <= openai_tables["encoder"].items()


@pytest.mark.slow
def test_truncated_long_words_from_a_cold_start(monkeypatch, openai_tables):
    """Long words under truncation merge a window at a time (``merge_prefix``), also from empty tables."""
    rng = random.Random(5)
    tok = _fresh_tokenizer(monkeypatch)
    for _ in range(20):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(300, 1500)))
        mapped = "".join(tok._bpe.byte_encoder[b] for b in word.encode())
        row = tok(word, truncate=True)[0]
        assert torch.equal(row[1:76], torch.tensor(_openai_word_ids(openai_tables, mapped)[:75]))
