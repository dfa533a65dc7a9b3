"""Tokenizer throughput: clipforge's ``tokenize`` against OpenCLIP's pure-Python ``SimpleTokenizer`` (and HF's
``CLIPTokenizerFast`` when transformers is importable) on synthetic web captions, with an id-parity check.

Run with the reference environment, which has open_clip:
    PYTHONPATH=src /work/refenv/venv/bin/python bench/bench_tokenizer.py [--captions 20000]
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import clipforge.tokenizer as cf_tokenizer
import torch

_SUBJECTS = ("dog", "cat", "woman", "man", "child", "bicycle", "car", "house", "tree", "bird", "horse", "boat",
             "pizza", "laptop", "guitar", "train", "mountain", "beach", "street", "kitchen", "garden", "bridge",
             "sunset", "flower", "coffee", "cake", "wedding", "dress", "shoe", "chair", "lamp", "skyline", "river",
             "puppy", "kitten", "elephant", "giraffe", "surfer", "skateboard", "motorcycle", "airplane", "castle")
_ADJECTIVES = ("small", "large", "red", "blue", "green", "old", "modern", "vintage", "beautiful", "cute", "happy",
               "wooden", "bright", "dark", "snowy", "sunny", "crowded", "empty", "colorful", "rustic", "golden",
               "handmade", "tiny", "giant", "black and white", "close-up", "aerial", "blurry", "minimalist")
_VERBS = ("sitting on", "standing next to", "running through", "lying on", "looking at", "parked near",
          "flying over", "floating on", "walking along", "playing with", "hanging above", "covered in")
_PLACES = ("the beach", "a table", "the grass", "a city street", "the snow", "a wooden floor", "the river",
           "a white background", "the park", "a busy market", "the mountains", "an old building")
_TEMPLATES = ("a photo of a {a} {s}", "{a} {s} {v} {p}", "A {s} {v} {p}.", "close up of a {a} {s}",
              "{S} {v} {p} at sunset", "stock photo: {a} {s} isolated on white", "my {s} {v} {p}!!",
              "Vector illustration of a {a} {s}", "{a} {s} for sale - free shipping", "the {s} is {v} {p}")
_EXTRAS = ("café", "naïve", "crème brûlée", "Zürich", "São Paulo", "東京タワー", "北京", "서울", "Москва",
           "Αθήνα", "🐶", "😍😍", "❤️", "👍🏽", "🇫🇷", "&amp;", "&quot;quoted&quot;", "&#39;s", "AT&T",
           "“smart quotes”", "it’s", "—", "…", "ＦＵＬＬ ＷＩＤＴＨ", "cafÃ©", "Â£20", "ﬁne", "₹500", "½ price")
_SUFFIXES = ("", "", "", " #travel #photography", " | Shutterstock", " (2019)", " - IMG_4032.JPG",
             " https://example.com/p?id=42", " @johndoe", " 4K wallpaper", " by John Smith, 1987")


def make_captions(n: int, seed: int = 0, extra_fraction: float = 0.25) -> list[str]:
    """``n`` deterministic web-like captions; ``extra_fraction`` of them carry non-ASCII, emoji or HTML."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        parts = []
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 5))):  # 1 to 5 clauses: 5 to ~60 words
            s, a = rng.choice(_SUBJECTS), rng.choice(_ADJECTIVES)
            parts.append(rng.choice(_TEMPLATES).format(s=s, S=s.capitalize(), a=a, v=rng.choice(_VERBS),
                                                       p=rng.choice(_PLACES)))
        text = ", ".join(parts) + rng.choice(_SUFFIXES)
        if rng.random() < extra_fraction:
            words = text.split(" ")
            words.insert(rng.randrange(len(words) + 1), rng.choice(_EXTRAS))
            text = " ".join(words)
        if rng.random() < 0.1:
            text = text.upper() if rng.random() < 0.5 else f"  {text}\n"
        captions.append(text)
    return captions


def _time_pair(ours, theirs, captions: list[str], repeats: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Both tokenizers' ids and timings: the first (cold-cache) call, then the best of ``repeats`` calls,
    alternating between the two. Wall-clock and CPU seconds of this process: both tokenizers run on one
    thread, so CPU time is what they cost even while other processes load the machine."""
    seconds = {}
    outputs = {}
    for round_ in range(repeats + 1):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            wall, cpu = time.perf_counter(), time.process_time()
            outputs[name] = fn(captions)
            elapsed = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
            for clock, value in elapsed.items():
                key = f"{name}_{'cold' if round_ == 0 else 'warm'}_{clock}"
                seconds[key] = min(seconds.get(key, float("inf")), value)
    return outputs["ours"], outputs["theirs"], seconds


def _clear_caches() -> None:
    """Empty clipforge's word and chunk caches, so the next call starts cold like a fresh OpenCLIP tokenizer."""
    bpe = cf_tokenizer._shared_bpe()
    bpe.word_cache.clear()
    for cache in bpe.chunk_caches.values():
        cache.clear()


def _hf_fast_tokenizer(folder: Path):
    """HF CLIPTokenizerFast built offline from clipforge's packaged vocabulary and merges, or a reason why not."""
    try:
        import transformers
        from transformers import CLIPTokenizerFast
    except ImportError as e:
        return None, f"transformers not importable ({e})"
    bpe = cf_tokenizer._shared_bpe()
    merges = sorted(bpe.ranks, key=bpe.ranks.get)
    try:
        if int(transformers.__version__.split(".")[0]) >= 5:  # takes the vocabulary and merges themselves
            return CLIPTokenizerFast(vocab=dict(bpe.encoder), merges=merges), None
        (folder / "vocab.json").write_text(json.dumps(bpe.encoder), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                           encoding="utf-8")
        return CLIPTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")), None
    except Exception as e:  # any construction failure only skips this optional comparison
        return None, f"CLIPTokenizerFast could not be built from local files ({e})"


def _hf_ids(hf, captions: list[str]) -> torch.Tensor:
    """HF ids with padding set to 0 as in OpenAI's layout (HF pads with end-of-text)."""
    ids = hf(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    after_eot = (ids == hf.eos_token_id).long().cumsum(dim=1) - (ids == hf.eos_token_id).long() > 0  # (N, 77)
    return ids.masked_fill(after_eot, 0)


def _mismatches(ids: torch.Tensor, reference: torch.Tensor) -> int:
    return int((ids != reference).any(dim=1).sum())


def run(n_captions: int = 20000, repeats: int = 3, extra_fraction: float = 0.25) -> dict:
    """Time the tokenizers on ``n_captions`` captions; captions/s, speed-up over OpenCLIP, id mismatches.

    Cold: the first call, caches empty (a fresh OpenCLIP tokenizer, clipforge's caches cleared); warm: the
    best later call, as in training where the same words recur. Speed-ups are ratios of CPU time
    (``*_wall`` ones of wall-clock time); captions/s are wall-clock.
    """
    captions = make_captions(n_captions, extra_fraction=extra_fraction)
    result = {"n_captions": n_captions,
              "non_ascii_or_html_fraction": sum(not c.isascii() or "&" in c for c in captions) / n_captions}
    ours_fn = lambda c: cf_tokenizer.tokenize(c, truncate=True)  # noqa: E731
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        result["open_clip_skipped"] = f"open_clip not importable ({e})"
        _clear_caches()
        ours, _, s = _time_pair(ours_fn, lambda c: None, captions, repeats)
    else:
        oc_tok = SimpleTokenizer()
        _clear_caches()
        ours, reference, s = _time_pair(ours_fn, lambda c: oc_tok(c, context_length=77), captions, repeats)
        result.update(open_clip_cold_captions_per_s=n_captions / s["theirs_cold_wall"],
                      open_clip_warm_captions_per_s=n_captions / s["theirs_warm_wall"],
                      speedup_cold=s["theirs_cold_cpu"] / s["ours_cold_cpu"],
                      speedup_warm=s["theirs_warm_cpu"] / s["ours_warm_cpu"],
                      speedup_cold_wall=s["theirs_cold_wall"] / s["ours_cold_wall"],
                      speedup_warm_wall=s["theirs_warm_wall"] / s["ours_warm_wall"],
                      mismatches_vs_open_clip=_mismatches(ours, reference))
    result.update(clipforge_cold_captions_per_s=n_captions / s["ours_cold_wall"],
                  clipforge_warm_captions_per_s=n_captions / s["ours_warm_wall"])
    with tempfile.TemporaryDirectory() as folder:
        hf, reason = _hf_fast_tokenizer(Path(folder))
        if hf is None:
            result["hf_fast_skipped"] = reason
        else:  # HF's Rust tokenizer may use several threads: wall-clock only
            hf_ids, _, hf_s = _time_pair(lambda c: _hf_ids(hf, c), lambda c: None, captions, repeats)
            result.update(hf_fast_warm_captions_per_s=n_captions / hf_s["ours_warm_wall"],
                          hf_fast_mismatches_vs_clipforge=_mismatches(hf_ids, ours))  # HF skips ftfy and unescaping
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=20000, help="number of synthetic captions")
    parser.add_argument("--repeats", type=int, default=3, help="warm repetitions (best one is reported)")
    parser.add_argument("--extra-fraction", type=float, default=0.25,
                        help="fraction of captions given non-ASCII text, emoji or HTML entities")
    args = parser.parse_args()
    for key, value in run(args.captions, args.repeats, args.extra_fraction).items():
        shown = (f"{value:,.1f}" if value >= 100 else f"{value:.3f}") if isinstance(value, float) else value
        print(f"{key:>34}: {shown}")


if __name__ == "__main__":
    main()
