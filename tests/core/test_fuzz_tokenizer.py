"""Fuzzing the tokenizer (issue 11): on generated Unicode its ids equal an independent copy of OpenAI's
``simple_tokenizer`` algorithm, it never raises on a string, and its time per character is bounded.
(tests/test_tokenizer_truncation.py covers the truncation bound on long words.)"""
import gzip
import html
import random
import re
import time
from functools import lru_cache
from importlib import resources

import ftfy
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.tokenizer import Tokenizer, tokenize

SPECIALS = r"<\|startoftext\|>|<\|endoftext\|>|"
WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Pieces that exercise ftfy (mojibake), HTML entities, odd whitespace, ligatures, special-token text.
TRICKY = ["&amp;", "&lt;b&gt;", "Ã©", "â€™", "\u00a0", "\u2009", "\t\n", "ﬁ", "İ", "ß", "'S", "'ll", "<|endoftext|>",
          "<|STARTOFTEXT|>", "\u0301", "👩‍👩‍👧", "٣", "東京", "a", " ", "1", "!"]
unicode_texts = st.one_of(
    st.text(max_size=120),
    st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=3)), max_size=40).map("".join),
)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _ReferenceTokenizer:
    """OpenAI's clip/simple_tokenizer.py, re-typed from its published algorithm (no caches, no shortcuts)."""

    def __init__(self, special_tokens_in_text: bool):
        merges_file = resources.files("clipforge.assets") / "bpe_simple_vocab_16e6.txt.gz"
        merges = gzip.decompress(merges_file.read_bytes()).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        self.merges = merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.vocab = vocab
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.pattern = regex.compile((SPECIALS if special_tokens_in_text else "") + WORDS, regex.IGNORECASE)

    def bpe(self, token: str) -> list[str]:
        if token in ("<|startoftext|>", "<|endoftext|>"):
            return [token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            first, second = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if (first, second) not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return list(word)

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = re.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for token in self.pattern.findall(text):
            if token not in ("<|startoftext|>", "<|endoftext|>"):
                token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids


@lru_cache(maxsize=None)
def _reference(special_tokens_in_text: bool) -> _ReferenceTokenizer:
    return _ReferenceTokenizer(special_tokens_in_text)


@settings(max_examples=300, deadline=None)
@given(text=unicode_texts)
def test_ids_equal_the_reference_algorithm_on_generated_unicode(text):
    start = time.perf_counter()
    ours = Tokenizer().encode(text)
    elapsed = time.perf_counter() - start
    assert ours == _reference(False).encode(text)
    assert Tokenizer(special_tokens_in_text=True).encode(text) == _reference(True).encode(text)  # OpenAI's own
    assert elapsed < 1.0 + 0.01 * len(text)  # generous: a pathological text would take far longer


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(unicode_texts, min_size=1, max_size=4), context_length=st.integers(2, 80))
def test_batches_never_raise_and_keep_their_shape(texts, context_length):
    rows = tokenize(texts, context_length=context_length, truncate=True)
    assert tuple(rows.shape) == (len(texts), context_length)
    for text, row in zip(texts, rows.tolist()):
        ids = _reference(False).encode(text)[: context_length - 2]
        assert row[: len(ids) + 1] == [49406, *ids]


def test_time_per_character_is_bounded_on_random_code_points():
    rng = random.Random(11)
    points = [c for c in range(0x20, 0x30000) if not 0xD800 <= c < 0xE000]
    for size in (10_000, 100_000):
        text = "".join(chr(rng.choice(points)) for _ in range(size))
        start = time.perf_counter()
        row = tokenize(text, truncate=True)[0]
        assert time.perf_counter() - start < 5 + size * 2e-5, size
        assert row[0] == 49406 and row[-1] == 49407
