"""CLIP tokenizer: exact OpenAI ids (stored cases), padding and truncation, decoding, and the fast paths
(ftfy shortcut, caches, batch fill) against the plain definition."""
import html
import json
import pickle
import random
import sys
from pathlib import Path

import ftfy
import ftfy.badness
import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import clipforge
from clipforge import tokenizer as tk
from clipforge import text_clean as tc
from clipforge.tokenizer import Tokenizer, get_tokenizer, tokenize

CASES = json.loads((Path(__file__).parents[1] / "fixtures" / "tokenizer_cases.json").read_text(encoding="utf-8"))
SOT, EOT = 49406, 49407

# Pieces that exercise every branch of the cleaning: mojibake, HTML entities, quotes, ligatures, width forms,
# C0/C1 controls, line breaks, escape sequences, surrogates, combining marks, emoji, other scripts.
TRICKY = ["a", "Z", " ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x00", "\x7f", "&", "&amp;",
          "&amp;amp;", "&lt;", "<", ">", "&#39;", "&#x2019;", "&quot;", "&#28;", "é", "É", "Ã", "Â", "©", "â€™",
          "Ã©", "Ã ", "Â£", "€", "’", "“", "”", "—", "–", "…", "ﬁ", "ﬀ", "Ｆ", "＆", "　", "\x85", "\x93", "\x80",
          "\u2028", "\u2029", "\x1b[31m", "\x1b", "\ufeff", "\ud83d", "\ude00", "😀", "❤️", "👍🏽", "東京", "Мос",
          "вЂ", "ΑΒ", "e\u0301", "\u0345", "İ", "ß", "½", "°", "×²", "√±", "ØØ", "à²", "\xa0", "\xad", "'s", "'LL",
          "\"", "1", "23", ".", "!", "#", ";", "<|endoftext|>", "<|startoftext|>"]


def _row(ids: list[int], length: int = 77) -> list[int]:
    return [SOT, *ids, EOT] + [0] * (length - len(ids) - 2)


def _mixed_texts(n: int, seed: int = 0) -> list[str]:
    """Caption-like texts, with tricky pieces mixed into many of them."""
    rng = random.Random(seed)
    words = ["a", "photo", "of", "the", "dog", "Cat", "on", "beach", "sunset", "it's", "we'll", "2019", "4K",
             "#travel", "@user", "https://example.com/p?id=1", "(vintage)", "C++", "50%", "rock'n'roll"]
    texts = []
    for _ in range(n):
        parts = [rng.choice(words) for _ in range(rng.randint(0, 30))]
        for _ in range(rng.choice([0, 0, 1, 3])):
            parts.insert(rng.randint(0, len(parts)), rng.choice(TRICKY))
        texts.append(rng.choice([" ", "", ", "]).join(parts))
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_stored_cases_match_openai_ids():
    texts = [case["text"] for case in CASES["cases"]]
    expected = torch.tensor([case["ids"] for case in CASES["cases"]])
    assert len(texts) == 161
    ids = tokenize(texts, context_length=CASES["context_length"], truncate=CASES["truncate"])
    assert ids.dtype == torch.long and ids.shape == expected.shape
    mismatched = [t for t, a, b in zip(texts, ids, expected) if not torch.equal(a, b)]
    assert mismatched == []
    for text, row in zip(texts[::10], expected[::10]):  # one at a time too (cold and warm caches agree)
        assert torch.equal(tokenize(text, truncate=True)[0], row)


def test_hello_world_and_vocabulary(tok):
    ids = tokenize("Hello World!")
    assert ids.shape == (1, 77)
    assert ids[0, :5].tolist() == [SOT, 3306, 1002, 256, EOT] and not ids[0, 5:].any()
    assert tok.encode("Hello World!") == [3306, 1002, 256]
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (49408, SOT, EOT)
    assert tok.encoder["<|startoftext|>"] == SOT and tok.encoder["<|endoftext|>"] == EOT
    assert tok.encoder["hello</w>"] == 3306 and len(tok.encoder) == 49408


def test_empty_and_blank_texts():
    assert tokenize("")[0].tolist() == _row([])
    assert tokenize(["   ", "\n\t"]).tolist() == [_row([]), _row([])]
    assert tokenize([]).shape == (0, 77)


def test_too_long_text_raises_with_a_clear_message():
    text = "a photo of a dog " * 20  # 100 words: 102 tokens with start and end of text
    with pytest.raises(ValueError) as info:
        tokenize(["short", text])
    message = str(info.value)
    assert "text 1" in message and "a photo of a dog a photo" in message and "..." in message
    assert "102 tokens" in message and "context_length=77" in message and "truncate=True" in message
    assert len(message) < 400  # the text is abbreviated
    with pytest.raises(ValueError, match="2 more texts are too long"):
        tokenize([text, text, text])


def test_truncation_cuts_and_ends_with_end_of_text(tok):
    text = "a photo of a dog " * 20
    ids = tokenize(["a cat", text], truncate=True)
    assert ids.shape == (2, 77)
    assert ids[1, 0] == SOT and ids[1, -1] == EOT and (ids[1] != 0).all()
    assert ids[1, 1:-1].tolist() == tok.encode(text)[:75]
    assert ids[0].tolist() == _row(tok.encode("a cat"))
    exact = tokenize("a photo of " + "dog " * 72, truncate=False)  # 75 text tokens fit exactly
    assert exact[0, -1] == EOT and exact[0, -2] != 0


def test_context_length_parameter(tok):
    assert tokenize("a photo of a cat", context_length=8)[0].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT, 0]
    assert tokenize("a photo of a cat", context_length=4, truncate=True)[0].tolist() == [SOT, 320, 1125, EOT]
    short = Tokenizer(context_length=16)
    assert short(["a", "b c"]).shape == (2, 16)
    assert short("a", context_length=5).shape == (1, 5)  # per-call override
    with pytest.raises(ValueError, match="context_length=6"):
        Tokenizer(context_length=6)("one two three four five")
    assert Tokenizer(context_length=6, truncate=True)("one two three four five")[0, -1] == EOT
    for bad in (1, 0, 2.5, True, "77"):
        with pytest.raises(ValueError, match="context_length must be an int >= 2"):
            tokenize("a", context_length=bad)


def test_get_tokenizer_uses_model_context_and_truncates_by_default():
    tiny = get_tokenizer("tiny-vit")
    assert tiny.context_length == 32 and tiny.truncate
    assert tiny("word " * 100).shape == (1, 32)
    assert get_tokenizer("ViT-B/32").context_length == 77
    assert get_tokenizer("tiny-vit", context_length=20).context_length == 20
    assert get_tokenizer().context_length == 77 and get_tokenizer().truncate
    assert get_tokenizer(64).context_length == 64 and get_tokenizer(context_length=48).context_length == 48
    assert not get_tokenizer(truncate=False).truncate
    assert get_tokenizer("tiny-vit")._bpe is get_tokenizer()._bpe is tk._shared_bpe()  # merges parsed once
    with pytest.raises(ValueError, match="two context lengths"):
        get_tokenizer(64, context_length=32)
    with pytest.raises(ValueError, match="unknown model"):
        get_tokenizer("no-such-model")
    with pytest.raises(TypeError, match="model name"):
        get_tokenizer(3.5)


def test_public_api_names():
    assert clipforge.tokenize is tokenize and clipforge.Tokenizer is Tokenizer
    assert clipforge.get_tokenizer is get_tokenizer


def test_bad_inputs_give_clear_errors():
    with pytest.raises(TypeError, match=r"texts\[1\] is a NoneType"):
        tokenize(["fine", None])
    with pytest.raises(TypeError, match="str or a list of str"):
        tokenize(123)
    with pytest.raises(TypeError, match=r"texts\[0\] is a bytes"):
        tokenize([b"bytes"])


def test_decode(tok):
    assert tok.decode(tokenize("Hello World!")[0]) == "hello world !"
    assert tok.decode([SOT, 320, 1125, 539, 320, 2368, EOT, 0, 0]) == "a photo of a cat"
    assert tok.decode(tok.encode("café 東京 🐶")) == "café 東京 🐶"
    assert tok.decode([0, 0]) == "!!"  # id 0 is '!' when no end-of-text marks padding
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([49408])
    with pytest.raises(ValueError, match="one sequence"):
        tok.decode(tokenize(["a", "b"]))


@pytest.mark.parametrize("text", ["a photo of a cat", "Two dogs play in the snow, 2019.", "it's a #sunset!!",
                                  "Ein Hund im Schnee", "東京タワーの夜景", "I ❤️ NY"])
def test_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.encode(tok.decode(ids)) == ids
    assert tok.decode(tokenize(text)[0]).replace(" ", "") == tc.clean_text(text).replace(" ", "")


def test_special_token_text(tok):
    # Default (OpenCLIP): the literal strings are ordinary text. Opt-in: OpenAI's original special ids.
    assert tok.encode("<|endoftext|>") == [27, 347, 40786, 4160, 91, 285]
    openai = Tokenizer(special_tokens_in_text=True)
    assert openai.encode("text <|endoftext|> more") == [4160, EOT, 750]
    assert openai.encode("<|STARTOFTEXT|>") == [SOT]
    assert openai.encode("a photo of a cat") == tok.encode("a photo of a cat")
    assert tok.encode("text <|endoftext|> more") == [4160, 27, 347, 40786, 4160, 91, 285, 750]  # caches apart


def test_fast_path_matches_the_plain_definition(tok):
    texts = _mixed_texts(400) + [case["text"] for case in CASES["cases"]] + TRICKY
    batch = tok(texts, truncate=True, context_length=40)
    for text, row in zip(texts, batch):
        ids = tok._encode_reference(text)
        assert tok.encode(text) == ids, text
        expected = ids[:38] if len(ids) > 38 else ids
        assert row.tolist() == _row(expected, 40), text


def test_bounded_caches_stay_correct(tok, monkeypatch):
    monkeypatch.setattr(tk, "_CACHE_SIZE", 5)
    texts = _mixed_texts(60, seed=1)
    assert [tok.encode(t) for t in texts] == [tok._encode_reference(t) for t in texts]
    assert len(tok._chunk_cache) <= 5 and len(tok._bpe.word_cache) <= 5


def test_pickled_tokenizer_keeps_settings():
    original = Tokenizer(context_length=12, truncate=True, special_tokens_in_text=True)
    copy = pickle.loads(pickle.dumps(original))
    assert (copy.context_length, copy.truncate, copy.special_tokens_in_text) == (12, True, True)
    assert len(pickle.dumps(original)) < 1000  # settings only, not the vocabulary
    assert torch.equal(copy("a <|endoftext|> " * 9), original("a <|endoftext|> " * 9))


_PLAIN_ASCII = st.text(alphabet=st.sampled_from([chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + list("\t\n\r")),
                       max_size=60)


@settings(max_examples=300, deadline=None)
@given(_PLAIN_ASCII)
def test_plain_ascii_needs_no_ftfy(text):
    # The premise of the first shortcut: ftfy and html.unescape leave such text unchanged but for CR -> LF.
    assert tc._NEEDS_FULL_CLEAN.search(text) is None
    assert ftfy.fix_text(text).split() == text.split() and html.unescape(text) == text
    assert tc.clean_chunks(text) == tc.clean_text(text).split()


_TRICKY_TEXT = st.lists(st.one_of(st.sampled_from(TRICKY), st.characters()), max_size=14).map("".join)


@settings(max_examples=400, deadline=None)
@given(_TRICKY_TEXT)
def test_ftfy_shortcut_equals_ftfy(text):
    assert tc._FTFY.fix_text(text) == ftfy.fix_text(text)
    assert tc._FTFY._may_be_mojibake(text) == ftfy.badness.is_bad(text)
    cleaned = tc.clean_text(text)
    assert tc.clean_chunks(text) == (cleaned.split(" ") if cleaned else [])


def _sample_match(items, rng: random.Random) -> str:
    """A string built to match one parsed regex alternative (one character per item)."""
    out = []
    for op, value in items:
        if op is tc._sre.LITERAL:
            out.append(chr(value))
        elif op is tc._sre.IN:
            chars = tc._literal_chars((op, value))
            out.append(rng.choice(sorted(chars)) if chars else rng.choice(" a"))  # \s or \w
        elif op is tc._sre.ANY:
            out.append(rng.choice("xé "))
        elif op is tc._sre.MAX_REPEAT:
            low, _, sub = value
            out.append("".join(_sample_match(sub, rng) for _ in range(low or rng.randint(0, 1))))
    return "".join(out)


def test_mojibake_windows_find_every_alternative():
    # The windowed search must agree with ftfy's full search on a match of each of its regex's alternatives.
    assert tc._FTFY.prefilter is not None, "ftfy's mojibake regex changed shape: the shortcut is off (slower)"
    witnesses, width = tc._FTFY.prefilter
    assert width <= 16 and not witnesses.search("".join(map(chr, range(128))))
    pattern = ftfy.badness.BADNESS_RE
    alternatives = tc._sre.parse(pattern.pattern, pattern.flags).data[0][1][1]
    rng, detected = random.Random(0), set()
    for index, alternative in enumerate(alternatives):
        for _ in range(20):
            text = rng.choice(["", "ab ", "Ab c "]) + _sample_match(alternative, rng) + rng.choice(["", " cd", "y"])
            bad = ftfy.badness.is_bad(text)
            assert tc._FTFY._may_be_mojibake(text) == bad, text
            if bad:
                detected.add(index)
    assert len(detected) == len(alternatives)
    assert tc._FTFY._may_be_mojibake("cafÃ© au lait") and not tc._FTFY._may_be_mojibake("café au lait")


def test_whitespace_split_premise():
    # str.split() stands in for OpenAI's regex \s+ after cleaning: they differ only on U+001C..U+001F, which
    # ftfy and html.unescape remove, and lower-casing neither makes nor removes whitespace.
    space = regex.compile(r"\s")
    differ = [c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace() != bool(space.match(c))]
    assert differ == ["\x1c", "\x1d", "\x1e", "\x1f"]
    for c in differ:
        assert tc.clean_text(f"a{c}b") == "ab" and tc.clean_text(f"a&#{ord(c)};b") == "ab"
    lowered = [(c, c.lower()) for c in map(chr, range(sys.maxunicode + 1)) if c.lower() != c]
    assert all(low.isspace() if c.isspace() else not any(x.isspace() for x in low) for c, low in lowered)
