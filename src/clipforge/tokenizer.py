"""CLIP's byte-level BPE tokenizer (Radford et al. 2021; OpenAI's ``simple_tokenizer.py`` and merges file).

Token ids equal OpenAI's for any text, computed fast: OpenAI's cleaning (ftfy, HTML unescaping, whitespace,
lower case) takes exact shortcuts where ftfy has nothing or little to do, ids are cached per
whitespace-separated chunk of text, under truncation BPE stops once the kept ids are known (a long word is
merged a window at a time, keeping the tokens proven final), and the padded batch is filled with numpy.
The first call starts quickly: the merges used come from a prebuilt table of them, and encoding needs only
their ranks (the full vocabulary tables are built when decoding or an export asks for them).
"""
from __future__ import annotations

import gzip
import numbers
import sys
import zlib
from functools import cached_property, lru_cache
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import Sequence

import numpy as np
import regex
import torch

from clipforge.text_clean import clean_chunks, clean_text

DEFAULT_CONTEXT_LENGTH = 77
SOT_TEXT, EOT_TEXT = "<|startoftext|>", "<|endoftext|>"
_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
_MERGE_TABLE = "bpe_simple_vocab_16e6_merges.txt"  # the merges used, unpacked: made from _MERGES_FILE, see below
_NUM_MERGES = 49152 - 256 - 2  # OpenAI's vocabulary: 512 byte tokens + 48894 merges + 2 special = 49408
_FIRST_MERGE_ID = 512  # the token made by the merge of rank r has id 512 + r
_SOT_ID, _EOT_ID = _FIRST_MERGE_ID + _NUM_MERGES, _FIRST_MERGE_ID + _NUM_MERGES + 1
_VOCAB_SIZE = _EOT_ID + 1
_CACHE_SIZE = 100_000  # entries per cache (words, chunks); a full cache is emptied
# Under truncation, a chunk longer than this is tokenized only as far as the kept ids reach, and not cached;
# a word longer than the window is merged a window of byte symbols at a time (see _BPE.merge_prefix).
_LONG_CHUNK = 256
_BPE_WINDOW = 128

# OpenAI's pre-tokenizer: contractions, letter runs, single digits, runs of other non-space characters.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SPECIAL_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|"


# ---- BPE and the tokenizer ----

def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    return dict(zip(printable + others, chars))


def _asset(name: str) -> bytes:
    path = Path(__file__).with_name("assets") / name  # importlib.resources costs more than reading the merges
    return path.read_bytes() if path.is_file() else (resources.files("clipforge") / "assets" / name).read_bytes()


def _read_merge_lines() -> list[str]:
    """The merges OpenAI uses, "first second" in rank order (lines 2 to 48895 of the merges file), from the
    prebuilt table ``_MERGE_TABLE`` (``python -m clipforge.tokenizer`` writes it; a test checks it), or
    from the merges file itself when the table is missing."""
    try:
        lines = _asset(_MERGE_TABLE).decode("utf-8").split("\n")
    except FileNotFoundError:
        return _merge_lines_from_merges_file()
    if lines[-1:] == [""]:
        lines.pop()
    if len(lines) != _NUM_MERGES:
        raise ValueError(f"{_MERGE_TABLE} holds {len(lines)} merges, expected {_NUM_MERGES}: rebuild it with "
                         "python -m clipforge.tokenizer")
    return lines


def _merge_lines_from_merges_file() -> list[str]:
    """``_read_merge_lines`` from the packaged merges file. The merges used are its first sixth (525 kB of
    3.2 MB), so only about that much of it is decompressed."""
    stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip
    text = stream.decompress(_asset(_MERGES_FILE), 576 << 10)
    while text.count(b"\n") <= _NUM_MERGES and stream.unconsumed_tail:
        text += stream.decompress(stream.unconsumed_tail, 64 << 10)
    lines = text[:text.rfind(b"\n")].decode("utf-8").split("\n", _NUM_MERGES + 1)[1:_NUM_MERGES + 1]
    if len(lines) != _NUM_MERGES:
        raise ValueError(f"{_MERGES_FILE} holds {len(lines)} merges, expected {_NUM_MERGES}")
    return lines


def _merge_table_text() -> str:
    """The prebuilt merge table's text, from the merges file as OpenAI's ``simple_tokenizer`` reads it (all
    of it decompressed, lines 2 to 48895, each split into its two tokens): one "first second" line a merge."""
    text = gzip.decompress(_asset(_MERGES_FILE)).decode("utf-8")
    merges = [tuple(line.split()) for line in text.split("\n")[1:_NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{_MERGES_FILE} does not hold {_NUM_MERGES} merges of two tokens each")
    return "".join(f"{first} {second}\n" for first, second in merges)


class _BPE:
    """The merge ranks, parsed once and shared, with bounded caches of ids per word and per whitespace-free
    chunk of cleaned text (one chunk cache per pre-tokenizer pattern).

    Encoding needs only ``pair_ranks`` ("first second" -> rank): the token a merge makes has id
    ``512 + rank`` (the vocabulary is 256 byte tokens, the same with "</w>", then one token per merge, all
    distinct), so the ids of the tokens merged so far are recorded in ``token_ids`` as merges happen. The
    full ``encoder``, ``decoder`` and tuple-keyed ``ranks`` are built on first use (decoding, exports).
    """

    def __init__(self):
        self.pair_ranks: dict[str, int] = dict(zip(_read_merge_lines(), range(_NUM_MERGES)))
        if len(self.pair_ranks) != _NUM_MERGES:
            raise ValueError(f"the merges hold {len(self.pair_ranks)} distinct pairs, expected {_NUM_MERGES}")
        self.byte_encoder = _bytes_to_unicode()
        byte_tokens = list(self.byte_encoder.values())
        self.token_ids: dict[str, int] = {t: i for i, t in enumerate(byte_tokens + [t + "</w>" for t in byte_tokens])}
        self.specials = {SOT_TEXT: (_SOT_ID,), EOT_TEXT: (_EOT_ID,)}
        self.word_cache: dict[str, tuple[int, ...]] = {}
        self.chunk_caches: dict[str, dict[str, tuple[int, ...]]] = {}

    @cached_property
    def decoder(self) -> list[str]:
        """The vocabulary: token strings by id."""
        byte_tokens = list(self.byte_encoder.values())
        merged = [line.replace(" ", "") for line in self.pair_ranks]  # in rank order
        return byte_tokens + [t + "</w>" for t in byte_tokens] + merged + [SOT_TEXT, EOT_TEXT]

    @cached_property
    def encoder(self) -> dict[str, int]:
        """Token string -> id, for the whole vocabulary."""
        return {token: i for i, token in enumerate(self.decoder)}

    @cached_property
    def ranks(self) -> dict[tuple[str, str], int]:
        """(first, second) -> rank of that merge, as OpenAI's ``bpe_ranks``."""
        return {tuple(line.split(" ")): rank for line, rank in self.pair_ranks.items()}

    @cached_property
    def byte_decoder(self) -> dict[str, int]:
        return {c: b for b, c in self.byte_encoder.items()}

    @cached_property
    def max_token_length(self) -> int:
        """The longest token's length, ``max(map(len, self.decoder))`` without building the decoder."""
        return max(len(SOT_TEXT), len(EOT_TEXT), 1 + len("</w>"), max(map(len, self.pair_ranks)) - 1)

    def _merge_pair(self, symbols: list[str], pair: str, rank: int) -> list[str]:
        """``symbols`` with each occurrence of ``pair`` ("first second", of that rank) merged, recording the id
        of the token it makes."""
        first, second = pair.split(" ")
        self.token_ids[first + second] = _FIRST_MERGE_ID + rank
        return _merge_pair(symbols, first, second)

    def merge(self, word: str) -> list[str]:
        """BPE of one byte-mapped word: apply the lowest-ranked adjacent merge until none applies."""
        symbols = [*word[:-1], word[-1] + "</w>"]
        ranks = self.pair_ranks
        while len(symbols) > 1:
            pair = min(map(_pair_key, symbols, symbols[1:]), key=lambda p: ranks.get(p, _NUM_MERGES))
            rank = ranks.get(pair)
            if rank is None:
                break
            symbols = self._merge_pair(symbols, pair, rank)
        return symbols

    def merge_prefix(self, word: str, count: int, window: int) -> list[str]:
        """The first ``count`` tokens of ``merge(word)`` (all of them if fewer; maybe a few more), exactly, merging
        about ``window`` characters at a time rather than the whole word.

        Each window yields the tokens that ``_settled_tokens`` proves final. The rest of the word starts at a
        boundary between the whole word's tokens, where BPE splits into the BPE of each side, so it is tokenized
        on its own. The work depends on how far merges reach back across a window's end (in practice a few
        tokens with CLIP's merges); a window with no settled token is doubled, up to the whole word.
        """
        tail = word + "</w>"  # the whole word's text as its symbols spell it
        tokens, start, size = [], 0, window
        while len(tokens) < count:
            if start + size >= len(word):
                return tokens + self.merge(word[start:])
            settled = self._settled_tokens(tail, start, start + size)
            if settled:
                tokens += settled
                start += sum(map(len, settled))
                size = window
            else:  # no token of this window is settled yet: look further
                size *= 2
        return tokens

    def _settled_tokens(self, tail: str, start: int, end: int) -> list[str]:
        """Leading BPE tokens of ``tail[start:end]`` that BPE of all of ``tail[start:]`` has too.

        BPE applies merges in rising rank order (a merge's parts come from lower-ranked merges), each one's
        occurrences left to right, so tokens left of a point change only by merges left of it or by a merge
        across it. The window is merged with a wall at its right end; whenever the next rank could merge the
        token left of the wall with text beyond it (a merge (that token, y) with y a prefix of that text),
        the wall moves left past the token. What stays left of the wall is final and ends at a token boundary.
        """
        ranks = self.pair_ranks
        symbols = list(tail[start:end])
        wall, done = end, -1
        across = self._ranks_across(symbols[-1], tail, wall, done)
        while symbols:
            pair = min(map(_pair_key, symbols, symbols[1:]), key=lambda p: ranks.get(p, _NUM_MERGES), default=None)
            inside = ranks.get(pair, _NUM_MERGES)
            done = min(inside, across[0] if across else _NUM_MERGES)
            if done == _NUM_MERGES:
                break
            last = len(symbols[-1])
            if inside == done:
                symbols = self._merge_pair(symbols, pair, inside)
            if len(symbols[-1]) > last:  # the last token merged with its left neighbour: nothing crosses the wall
                across = self._ranks_across(symbols[-1], tail, wall, done)
            elif across and across[0] == done:
                wall -= len(symbols.pop())
                across = self._ranks_across(symbols[-1], tail, wall, done) if symbols else []
            else:
                across = [r for r in across if r > done]
        return symbols

    def _ranks_across(self, token: str, tail: str, wall: int, done: int) -> list[int]:
        """Ranks above ``done`` of the merges (token, y) with y a prefix of ``tail[wall:]``, lowest first."""
        prefix = token + " "
        found = (self.pair_ranks.get(prefix + tail[wall:wall + n]) for n in range(1, self.max_token_length + 1))
        return sorted(r for r in found if r is not None and r > done)

    def word_ids_uncached(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized word (the raw regex match), computed from scratch."""
        if word in self.specials:
            return self.specials[word]
        mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        return tuple(map(self.token_ids.__getitem__, self.merge(mapped)))

    def word_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized word, through the cache."""
        ids = self.word_cache.get(word)
        if ids is None:
            if len(self.word_cache) >= _CACHE_SIZE:
                self.word_cache.clear()
            ids = self.word_cache[word] = self.word_ids_uncached(word)
        return ids

    def word_prefix_ids(self, word: str, count: int) -> Sequence[int]:
        """The first ``count`` ids of ``word_ids(word)`` or more (all if fewer), with bounded work for long words."""
        if len(word) <= _BPE_WINDOW or word in self.specials:
            return self.word_ids(word)
        mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        return list(map(self.token_ids.__getitem__, self.merge_prefix(mapped, count, _BPE_WINDOW)))


_pair_key = "{} {}".format  # a pair of adjacent symbols as ``pair_ranks`` spells it (tokens hold no space)


def _merge_pair(symbols: list[str], first: str, second: str) -> list[str]:
    """``symbols`` with each occurrence of the pair (first, second) merged, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


@lru_cache(maxsize=1)
def _shared_bpe() -> _BPE:
    return _BPE()


@lru_cache(maxsize=None)
def _compiled_pattern(pattern: str) -> regex.Pattern:
    return regex.compile(pattern, regex.IGNORECASE)


def _check_context_length(context_length) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, numbers.Integral) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for start and end of text), got {context_length!r}")
    return int(context_length)


class TextTooLongError(RuntimeError, ValueError):
    """A text with more tokens than the context: OpenAI's ``clip.tokenize`` raises RuntimeError, clipforge's
    callers catch ValueError; this is both."""


class Tokenizer:
    """CLIP's tokenizer: texts -> zero-padded id tensors ``[49406, ..., 49407, 0, ...]``.

    ``context_length`` and ``truncate`` are the defaults of ``__call__``. By default the literal
    strings ``<|startoftext|>`` / ``<|endoftext|>`` inside a text are tokenized as ordinary text, as
    OpenCLIP does (a stray end-of-text id would move the text tower's pooling position); pass
    ``special_tokens_in_text=True`` to map them to their special ids, as OpenAI's original code does.
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False,
                 special_tokens_in_text: bool = False):
        self.context_length = _check_context_length(context_length)
        self.truncate = bool(truncate)
        self.special_tokens_in_text = bool(special_tokens_in_text)
        self._bpe = _shared_bpe()
        pattern = (_SPECIAL_PATTERN if special_tokens_in_text else "") + _WORD_PATTERN
        self._findall = _compiled_pattern(pattern).findall
        self._finditer = _compiled_pattern(pattern).finditer
        self._chunk_cache = self._bpe.chunk_caches.setdefault(pattern, {})
        self._cached_chunk_ids = self._chunk_cache.__getitem__
        self.vocab_size = _VOCAB_SIZE
        self.sot_token_id, self.eot_token_id = _SOT_ID, _EOT_ID

    @property
    def encoder(self) -> dict[str, int]:
        """Token string -> id (shared by all tokenizers: read only; built on first use)."""
        return self._bpe.encoder

    def __reduce__(self):  # pickle the settings only (DataLoader workers): the vocabulary is shared per process
        return Tokenizer, (self.context_length, self.truncate, self.special_tokens_in_text)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end of text."""
        return self._encode_all([text])[0]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
                 truncate: bool | None = None) -> torch.Tensor:
        """Ids of ``texts`` as a LongTensor (N, context_length), each row ``[sot, ..., eot, 0, ...]``.

        Raises ValueError for a text longer than ``context_length`` unless ``truncate`` (then the row is cut
        and ends with end-of-text, as in OpenCLIP). Unset arguments take this tokenizer's defaults.
        """
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        length = _check_context_length(self.context_length if context_length is None else context_length)
        truncate = self.truncate if truncate is None else truncate
        ids, counts = self._encode_all(texts, length - 2 if truncate else None)
        return torch.from_numpy(self._pad(ids, counts, texts, length, truncate))

    def _encode_all(self, texts: Sequence[str], limit: int | None = None) -> tuple[list[int], list[int]]:
        """The ids of all ``texts`` concatenated, and how many belong to each text; with ``limit``, only each
        text's first ``limit`` ids, and BPE stops once they are known."""
        ids, counts = [], []
        extend, cached = ids.extend, self._cached_chunk_ids
        try:
            for text in texts:
                start = len(ids)
                chunks = clean_chunks(text)
                try:
                    extend(chain.from_iterable(map(cached, chunks)))
                except KeyError:  # a chunk not seen yet: drop its text's partial ids, compute them one by one
                    del ids[start:]
                    extend(self._chunks_ids(chunks, limit))
                if limit is not None:
                    del ids[start + limit:]
                counts.append(len(ids) - start)
        except (AttributeError, TypeError):
            _check_all_str(texts)
            raise
        return ids, counts

    def _chunks_ids(self, chunks: list[str], limit: int | None) -> list[int]:
        """Ids of a text's chunks in order; with ``limit``, its first ``limit`` ids or a few more."""
        if limit is None:
            return [i for chunk in chunks for i in self._chunk_ids(chunk)]
        ids: list[int] = []
        for chunk in chunks:
            if len(ids) >= limit:
                break
            if len(chunk) > _LONG_CHUNK and chunk not in self._chunk_cache:
                ids += self._chunk_prefix_ids(chunk, limit - len(ids))
            else:
                ids += self._chunk_ids(chunk)
        return ids

    def _chunk_ids(self, chunk: str) -> tuple[int, ...]:
        """Ids of a whitespace-free chunk of cleaned text (OpenAI's regex never matches across whitespace)."""
        ids = self._chunk_cache.get(chunk)
        if ids is None:
            if len(self._chunk_cache) >= _CACHE_SIZE:
                self._chunk_cache.clear()
            ids = self._chunk_cache[chunk] = tuple(i for w in self._findall(chunk) for i in self._bpe.word_ids(w))
        return ids

    def _chunk_prefix_ids(self, chunk: str, limit: int) -> list[int]:
        """The first ``limit`` ids of a chunk or a few more: words in order until they are known, not cached."""
        ids: list[int] = []
        for match in self._finditer(chunk):
            if len(ids) >= limit:
                break
            ids += self._bpe.word_prefix_ids(match.group(), limit - len(ids))
        return ids

    def _encode_reference(self, text: str) -> list[int]:
        """OpenAI's plain path (full cleaning, regex over the whole text, no caches), to test the fast one."""
        words = self._findall(clean_text(text))
        return [i for w in words for i in self._bpe.word_ids_uncached(w)]

    def _pad(self, ids: list[int], counts: list[int], texts: Sequence[str], length: int,
             truncate: bool) -> np.ndarray:
        """Rows ``[sot, ids..., eot, 0...]`` of width ``length``; ids beyond ``length - 2`` cut if ``truncate``."""
        counts = np.array(counts, dtype=np.int64)  # (N,)
        too_long = np.flatnonzero(counts > length - 2)
        if too_long.size and not truncate:
            raise TextTooLongError(_too_long_message(texts, counts, too_long, length))
        values = np.fromiter(ids, dtype=np.int64, count=len(ids))  # (T,) all texts' ids
        rows = np.repeat(np.arange(len(counts)), counts)  # (T,)
        columns = np.arange(len(ids)) - np.repeat(np.cumsum(counts) - counts, counts) + 1  # (T,) sot is column 0
        if too_long.size:
            keep = columns <= length - 2
            rows, columns, values = rows[keep], columns[keep], values[keep]
        out = np.zeros((len(counts), length), dtype=np.int64)  # (N, L)
        out[:, 0] = self.sot_token_id
        out[rows, columns] = values
        out[np.arange(len(counts)), np.minimum(counts, length - 2) + 1] = self.eot_token_id
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor | np.ndarray) -> str:
        """Text of one id sequence, stopping at end-of-text (padding follows it) and skipping start-of-text.

        As OpenAI's decode, word ends become spaces (so ``"hello world!"`` comes back as ``"hello world !"``),
        and the result is stripped.
        """
        ids = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else list(ids)
        if not all(isinstance(i, numbers.Integral) for i in ids):
            raise ValueError("decode takes one sequence of int ids; for a batch use [tok.decode(row) for row in ids]")
        ids = [int(i) for i in ids]
        if self.eot_token_id in ids:
            ids = ids[:ids.index(self.eot_token_id)]
        unknown = [i for i in ids if not 0 <= i < self.vocab_size]
        if unknown:
            raise ValueError(f"token ids {unknown[:5]} are outside the vocabulary [0, {self.vocab_size})")
        tokens = "".join(self._bpe.decoder[i] for i in ids if i != self.sot_token_id)
        data = bytes(self._bpe.byte_decoder[c] for c in tokens)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()


def _check_all_str(texts: Sequence) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str: {text!r:.80}")


def _too_long_message(texts: Sequence[str], counts: np.ndarray, too_long: np.ndarray, length: int) -> str:
    first = int(too_long[0])
    text = texts[first] if len(texts[first]) <= 80 else texts[first][:77] + "..."
    others = f" ({too_long.size - 1} more texts are too long)" if too_long.size > 1 else ""
    return (f"text {first} {text!r} is {counts[first] + 2} tokens long with start and end of text, more than "
            f"context_length={length}{others}; pass truncate=True to cut it, or use a longer context_length")


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH,
             truncate: bool = False) -> torch.Tensor:
    """Ids of ``texts`` as a LongTensor (N, context_length) zero-padded, as OpenAI's ``clip.tokenize``.

    Too-long texts raise TextTooLongError (a RuntimeError and a ValueError) unless ``truncate=True``,
    which cuts them and keeps end-of-text last.
    """
    return _default_tokenizer()(texts, context_length=context_length, truncate=truncate)


@lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    return Tokenizer()


def get_tokenizer(name_or_context_length: str | int | None = None, context_length: int | None = None,
                  truncate: bool = True) -> Tokenizer:
    """A tokenizer for a registered model's context length (``"ViT-B-32"`` -> 77), or for a given length.

    ``get_tokenizer()`` uses 77 tokens; an int first argument is the context length; ``context_length``
    overrides a model's. Unlike ``tokenize``, it truncates by default, since training and zero-shot
    callers want long captions cut rather than an error; pass ``truncate=False`` to get a ValueError
    instead. All tokenizers share one parsed vocabulary and its caches.
    """
    arg = name_or_context_length
    if isinstance(arg, str):
        from clipforge.models.registry import get_model_config
        model_length = get_model_config(arg).text_cfg.context_length
        return Tokenizer(model_length if context_length is None else context_length, truncate)
    if arg is not None and (isinstance(arg, bool) or not isinstance(arg, numbers.Integral)):
        raise TypeError(f"get_tokenizer takes a model name (str) or a context length (int), got {arg!r}")
    if arg is not None and context_length is not None and arg != context_length:
        raise ValueError(f"get_tokenizer got two context lengths, {arg} and context_length={context_length}")
    length = next((n for n in (arg, context_length) if n is not None), DEFAULT_CONTEXT_LENGTH)
    return Tokenizer(length, truncate)


class HFTokenizer:
    """A Hugging Face tokenizer (``AutoTokenizer``) with clipforge's contract: texts -> LongTensor (N, L)
    padded with the model's pad id to ``context_length`` and truncated to it, as OpenCLIP's HFTokenizer."""

    def __init__(self, name: str, context_length: int = DEFAULT_CONTEXT_LENGTH):
        from clipforge.models.hf_text import require_transformers

        self.name, self.context_length = name, _check_context_length(context_length)
        self.tokenizer = require_transformers().AutoTokenizer.from_pretrained(name)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.context_length if context_length is None else context_length
        ids = self.tokenizer([" ".join(t.split()) for t in texts], return_tensors="pt", padding="max_length",
                             truncation=True, max_length=length)["input_ids"]
        return ids.long()

    def save(self, folder) -> None:
        """Write the tokenizer's files into ``folder`` (so that a saved model carries them)."""
        self.tokenizer.save_pretrained(str(folder))


def model_tokenizer(model) -> Tokenizer | HFTokenizer:
    """The tokenizer of a model (a CLIP, anything with a ``config``, or a ``CLIPConfig``): its Hugging Face
    tokenizer when its text tower has one, else the BPE tokenizer at its context length; both truncate.

    Every part of clipforge that turns text into ids for a model (training, validation, zero-shot,
    classify, eval, search) goes through this function.
    """
    config = getattr(model, "config", model)
    text_cfg = getattr(config, "text_cfg", None)
    if text_cfg is None:
        return get_tokenizer(int(getattr(model, "context_length", DEFAULT_CONTEXT_LENGTH)))
    name = text_cfg.hf_tokenizer_name or text_cfg.hf_model_name
    if name:
        return _hf_tokenizer(name, text_cfg.context_length)
    return get_tokenizer(text_cfg.context_length)


@lru_cache(maxsize=8)
def _hf_tokenizer(name: str, context_length: int) -> HFTokenizer:
    return HFTokenizer(name, context_length)


def _write_merge_table(argv: Sequence[str] | None = None) -> None:
    """``python -m clipforge.tokenizer [FOLDER]``: write the prebuilt merge table into the package's assets
    (or FOLDER) from the merges file."""
    folder = Path(argv[0]) if argv else Path(__file__).with_name("assets")
    path = folder / _MERGE_TABLE
    path.write_bytes(_merge_table_text().encode("utf-8"))
    print(f"wrote {path} ({path.stat().st_size:,} bytes, {_NUM_MERGES:,} merges)")


if __name__ == "__main__":
    _write_merge_table(sys.argv[1:])
