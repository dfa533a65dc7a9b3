"""Tokenizer throughput: clipforge's ``tokenize`` against OpenCLIP's pure-Python ``SimpleTokenizer`` (and HF's
``CLIPTokenizerFast`` when transformers is importable) on synthetic web captions, with an id-parity check.

Cold: a fresh child process per measurement times importing the tokenizer and its first call, as a user
sees it (the libraries both tokenizers import, torch, numpy, regex and ftfy, are imported before the clock
starts). Warm: the best later call in this process.

Run with the reference environment, which has open_clip:
    PYTHONPATH=src /tmp/clipbench/bin/python bench/bench_tokenizer.py [--captions 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import clipforge.tokenizer as cf_tokenizer

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


# One cold measurement, run as ``python -c _COLD_CHILD SIDE CAPTIONS_JSON N``: prints wall and CPU seconds of
# importing SIDE's tokenizer and tokenizing the first N captions, and the ids' sum (parity across sides).
_COLD_CHILD = r"""
import json, sys, time
import html, ftfy, numpy, regex, torch  # what both tokenizers import: loaded before the clock starts
side, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(path, encoding="utf-8") as f:
    captions = json.load(f)[:n]
wall, cpu = time.perf_counter(), time.process_time()
if side == "clipforge":
    import clipforge
    ids = clipforge.tokenize(captions, truncate=True)
else:  # OpenCLIP's tokenizer module alone (open_clip's __init__ imports all of open_clip); it loads its merges
    import importlib.util, os
    folder = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", os.path.join(folder, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ids = module.tokenize(captions, context_length=77)
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "ids_sum": int(ids.sum())}))
"""


def _cold_seconds(sides: list[str], captions: list[str], sizes: list[int], repeats: int) -> dict:
    """Best (lowest) cold wall and CPU seconds of each side for each number of captions, over ``repeats``
    fresh processes alternating between the sides, and whether the sides' ids agree (their sums).

    A first untimed run of each side lets Python write the modules' bytecode (``PYTHONDONTWRITEBYTECODE``
    is dropped) and reads the files into the page cache, as for an installed package run before.
    """
    src = str(Path(cf_tokenizer.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    best: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "captions.json"
        path.write_text(json.dumps(captions), encoding="utf-8")
        for round_ in range(repeats + 1):
            for n in sizes if round_ else [1]:
                for side in sides:
                    out = subprocess.run([sys.executable, "-c", _COLD_CHILD, side, str(path), str(n)], env=env,
                                         check=True, capture_output=True, text=True).stdout
                    if not round_:
                        continue
                    measured = json.loads(out.strip().splitlines()[-1])
                    entry = best.setdefault((side, n), {"wall": float("inf"), "cpu": float("inf")})
                    for clock in ("wall", "cpu"):
                        entry[clock] = min(entry[clock], measured[clock])
                    entry["ids_sum"] = measured["ids_sum"]
    return best


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


def _cpu_model() -> str:
    """The CPU's model name and its widest vector extension (Linux), or the platform's processor string."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    widest = next((f for f in ("avx512f", "avx2", "sse4_2") if f in flags), "none")
    return f"{model} ({os.cpu_count()} CPUs, {widest})"


def _mismatches(ids: torch.Tensor, reference: torch.Tensor) -> int:
    return int((ids != reference).any(dim=1).sum())


def run(n_captions: int = 20000, repeats: int = 3, extra_fraction: float = 0.25,
        cold_sizes: tuple[int, ...] = (1, 1000)) -> dict:
    """Time the tokenizers on ``n_captions`` captions; captions/s, speed-up over OpenCLIP, id mismatches.

    Cold: a fresh process imports the tokenizer and tokenizes the captions once (``cold_1000_*`` and the like:
    only the first 1000 captions, ``cold_1_*`` one caption: the first query's latency), best of ``repeats``
    processes; first pass: the first call in this process with the vocabulary loaded and the caches empty
    (a fresh OpenCLIP tokenizer, clipforge's caches cleared); warm: the best later call, as in training where
    the same words recur. Speed-ups are ratios of CPU time (``*_wall`` ones of wall-clock time); captions/s
    and cold seconds are wall-clock.
    """
    captions = make_captions(n_captions, extra_fraction=extra_fraction)
    result = {"cpu": _cpu_model(), "n_captions": n_captions,
              "non_ascii_or_html_fraction": sum(not c.isascii() or "&" in c for c in captions) / n_captions}
    ours_fn = lambda c: cf_tokenizer.tokenize(c, truncate=True)  # noqa: E731
    sizes = [n_captions] + [n for n in cold_sizes if n < n_captions]
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        result["open_clip_skipped"] = f"open_clip not importable ({e})"
        cold = _cold_seconds(["clipforge"], captions, sizes, repeats)
        _clear_caches()
        ours, _, s = _time_pair(ours_fn, lambda c: None, captions, repeats)
    else:
        cold = _cold_seconds(["clipforge", "open_clip"], captions, sizes, repeats)
        oc_tok = SimpleTokenizer()
        _clear_caches()
        ours, reference, s = _time_pair(ours_fn, lambda c: oc_tok(c, context_length=77), captions, repeats)
        for n in sizes:
            ours_cold, theirs_cold = cold["clipforge", n], cold["open_clip", n]
            prefix = "cold" if n == n_captions else f"cold_{n}"
            result.update({f"open_clip_{prefix}_s": theirs_cold["wall"],
                           f"speedup_{prefix}": theirs_cold["cpu"] / ours_cold["cpu"],
                           f"speedup_{prefix}_wall": theirs_cold["wall"] / ours_cold["wall"],
                           f"{prefix}_ids_agree": ours_cold["ids_sum"] == theirs_cold["ids_sum"]})
        result.update(open_clip_cold_captions_per_s=n_captions / cold["open_clip", n_captions]["wall"],
                      open_clip_warm_captions_per_s=n_captions / s["theirs_warm_wall"],
                      speedup_first_pass=s["theirs_cold_cpu"] / s["ours_cold_cpu"],
                      speedup_warm=s["theirs_warm_cpu"] / s["ours_warm_cpu"],
                      speedup_warm_wall=s["theirs_warm_wall"] / s["ours_warm_wall"],
                      mismatches_vs_open_clip=_mismatches(ours, reference))
    for n in sizes:
        result[f"clipforge_{'cold' if n == n_captions else f'cold_{n}'}_s"] = cold["clipforge", n]["wall"]
    result.update(clipforge_cold_captions_per_s=n_captions / cold["clipforge", n_captions]["wall"],
                  clipforge_first_pass_captions_per_s=n_captions / s["ours_cold_wall"],
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
        shown = (f"{value:,.1f}" if value >= 100 else f"{value:.3f}") if type(value) is float else value
        print(f"{key:>34}: {shown}")


if __name__ == "__main__":
    main()
