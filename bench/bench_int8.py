"""Int8 CPU inference against clipforge's float32: encoding speed, and what quantisation costs in quality.

Speed: ViT-B/32 and ViT-L/14 with seed-0 random weights; text at batch 1 (one caption) and images (scikit-image's
photos, preprocessed and cycled to the batch) at batch 1 and 64. ``clipforge int8`` is ``clipforge.load(...,
precision="int8")``, ``clipforge-onnx int8`` the ``export_onnx(..., int8=True)`` folder run by ONNX Runtime (as many
threads as torch), ``clipforge fp32`` what ``clipforge.load`` returns on a CPU; all timed interleaved in one
process, and each row's ``vs fp32`` is its throughput over float32's in the same case. Every int8 row also gives
the cosine of its features to float32's (mean and worst) over 64 photos or 64 captions.

Quality: a tiny-vit trained on the built-in data (``--train-steps``, in a temporary folder; or ``--quality-model``,
any model spec) encodes held-out shapes, and each int8 implementation is compared with its float32 model: feature
cosines (mean, worst) on those images, on the photos and on captions; zero-shot top-1 among all 48 colour-shape
pairs on images of the 8 pairs never seen in training (int8 minus fp32, in points); and the mean overlap of the
top 10 images that 248 text queries (the 48 pairs' prompts, 200 captions) retrieve from 2,000 shapes by exact
cosine search (1.0: the same ten images).

Kernels (``--parts kernels``): one linear layer of each shape those cases multiply (rows: a caption's tokens, one
image's, 64 images'; ViT-B/32's and ViT-L/14's MLP widths), float32 ``F.linear`` against the int8 product on each
engine this machine has (FBGEMM through PyTorch's ``x86`` engine, oneDNN): what the instruction set gives int8
before LayerNorm, attention and the rest of a model share the time.

Usage: ``python bench/bench_int8.py [--models ViT-B-32 ViT-L-14] [--batch-sizes 1 64] [--parts speed quality kernels]
[--quick] [--json out.json]``; under ``bench/capped.py avx2`` for what a CPU without AVX-512 does.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import cpu_flags, environment, isa_cap, optional_import, time_interleaved  # noqa: E402

import clipforge  # noqa: E402
from clipforge.data import ShapesDataset, class_names, templates  # noqa: E402
from clipforge.models import get_model_config  # noqa: E402
from clipforge.models.quantize import quantize_int8  # noqa: E402
from clipforge.tokenizer import tokenize  # noqa: E402
from clipforge.zeroshot import fill_template  # noqa: E402

# ONNX Runtime has no switch to cap its kernels (bench/capped.py): under a cap its rows say so
ONNX_INT8 = "clipforge-onnx int8" + (" (not capped)" if isa_cap() else "")

SEARCH_IMAGES, HELDOUT_IMAGES, CAPTION_QUERIES, TOP_K = 2000, 1000, 200, 10
Encoders = dict[str, dict[str, Callable[[torch.Tensor], torch.Tensor]]]


def photos(preprocess: Callable, count: int) -> torch.Tensor:
    """scikit-image's photos (its data folder's PNGs) preprocessed and cycled to ``count``; generated shapes
    where scikit-image is not installed."""
    from PIL import Image
    skimage = optional_import("skimage")
    if skimage is not None:
        folder = Path(skimage.__file__).parent / "data"
        images = [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.png"))]
    else:
        print("note: scikit-image is not installed (pip install scikit-image): generated shapes stand in for photos")
        data = ShapesDataset(24, "all", seed=3, image_size=224)
        images = [data.image(i) for i in range(len(data))]
    tensors = [preprocess(image) for image in images]
    return torch.stack([tensors[i % len(tensors)] for i in range(count)])


def captions(count: int, seed: int = 1) -> list[str]:
    from bench_tokenizer import make_captions
    return make_captions(count, seed=seed)


def build_encoders(name: str, onnx: bool, folder: Path) -> tuple[Encoders, Callable]:
    """``{impl: {"image": fn, "text": fn}}`` on one model's seed-0 weights, and its preprocessing."""
    fp32, preprocess = clipforge.load(name, random_init=True, device="cpu")
    impls = {"clipforge fp32": fp32, "clipforge int8": quantize_int8(copy.deepcopy(fp32))}
    encoders = {impl: {"image": model.encode_image, "text": model.encode_text} for impl, model in impls.items()}
    if onnx and optional_import("onnxruntime") is not None:
        from clipforge.io.onnx import OnnxEncoder, export_onnx
        export_onnx(fp32, folder / name, int8=True)
        session = OnnxEncoder(folder / name, threads=torch.get_num_threads())
        encoders[ONNX_INT8] = {"image": session.encode_image, "text": session.encode_text}
    return encoders, preprocess


def speed_case(name: str, encoders: Encoders, tower: str, batch: int, inputs: torch.Tensor,
               quality_inputs: torch.Tensor, repeats: int) -> list[dict[str, Any]]:
    """Rows of one (model, tower, batch) case: throughput, ratio to fp32, cosine to fp32's features."""
    x = inputs[:batch]
    fns = {impl: (lambda f=towers[tower]: f(x)) for impl, towers in encoders.items()}
    with torch.inference_mode():
        reference = encoders["clipforge fp32"][tower](quality_inputs)
        cosines = {impl: F.cosine_similarity(towers[tower](quality_inputs), reference)
                   for impl, towers in encoders.items()}
        warmup = 0 if x.shape == quality_inputs.shape else 1  # the cosines' pass warmed this very shape up
        seconds = time_interleaved(fns, repeats if batch == 1 else max(1, repeats // 3), warmup=warmup)
    unit = "img/s" if tower == "image" else "txt/s"
    base = batch / seconds["clipforge fp32"]
    return [{"bench": "int8", "case": f"{name} {tower} b{batch}", "impl": impl, "value": batch / secs, "unit": unit,
             "seconds": secs, "vs_fp32": batch / secs / base,
             "cos_mean": cosines[impl].mean().item(), "cos_worst": cosines[impl].min().item()}
            for impl, secs in seconds.items()]


def run_speed(models: tuple[str, ...], batch_sizes: tuple[int, ...], repeats: int, onnx: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            encoders, preprocess = build_encoders(name, onnx, Path(tmp))
            context = get_model_config(name).text_cfg.context_length
            images = photos(preprocess, max(64, *batch_sizes))
            texts = tokenize(captions(64), context, truncate=True)
            cases = [("text", 1, texts, texts)] + [("image", batch, images, images[:64]) for batch in batch_sizes]
            for tower, batch, inputs, judged in cases:
                rows += speed_case(name, encoders, tower, batch, inputs, judged, repeats)
                print(format_rows(rows[-len(encoders):]), flush=True)  # as it goes: a large model takes minutes
            del encoders
    return rows


# (case, rows, in, out): a text query's tokens and ViT-B/32's MLP; one image of ViT-B/32 (50 tokens) and of
# ViT-L/14 (257), and 64 images of ViT-B/32, each through the first MLP layer
KERNEL_SHAPES = (("text b1, B/32 MLP", 12, 512, 2048), ("text b1, L/14 MLP", 12, 768, 3072),
                 ("image b1, B/32 MLP", 50, 768, 3072), ("image b1, L/14 MLP", 257, 1024, 4096),
                 ("images b64, B/32 MLP", 64 * 50, 768, 3072))


def run_kernels(repeats: int) -> list[dict[str, Any]]:
    """Milliseconds of one linear layer per shape: float32 and the int8 product on each quantised engine."""
    from clipforge.models.quantize import pack_rows, quantize_rows
    rows = []
    for case, m, k, n in KERNEL_SHAPES:
        generator = torch.Generator().manual_seed(0)
        weight, bias = torch.randn(n, k, generator=generator) / k ** 0.5, torch.randn(n, generator=generator)
        x = torch.randn(m, k, generator=generator)
        values, scales = quantize_rows(weight)
        fns = {"fp32": lambda: F.linear(x, weight, bias)}
        for engine in ("x86", "onednn"):
            if engine in torch.backends.quantized.supported_engines:
                packed, reduce_range = pack_rows(values, scales, bias, engine)
                fns[f"int8 {engine}{' 7-bit' if reduce_range else ''}"] = \
                    lambda p=packed, r=reduce_range: torch.ops.quantized.linear_dynamic(x, p, reduce_range=r)
        seconds = time_interleaved(fns, repeats=max(repeats, 20), warmup=3)
        rows += [{"bench": "int8 kernel", "case": case, "impl": impl, "value": 1000 * secs, "unit": "ms",
                  "vs_fp32": seconds["fp32"] / secs} for impl, secs in seconds.items()]
        print(format_rows(rows[-len(fns):]), flush=True)
    return rows


def trained_model(steps: int, folder: Path) -> str:
    """A tiny-vit trained for ``steps`` on the built-in data (as the tests' trained model, longer): its run folder."""
    from clipforge.train import TrainConfig, train
    run = folder / "tiny-vit"
    train(TrainConfig(model="tiny-vit", train_data="builtin:5000", steps=steps, batch_size=32, lr=1.5e-3,
                      warmup=20, workers=0, save_every=steps, output=str(run)).validate())
    return str(run)


def _shapes_batches(preprocess: Callable, data: ShapesDataset) -> torch.Tensor:
    return torch.stack([preprocess(data.image(i)) for i in range(len(data))])


def quality_inputs(preprocess: Callable, context_length: int) -> dict[str, Any]:
    """Held-out images with their pair labels, the search corpus, the text queries and the photos."""
    heldout = ShapesDataset(HELDOUT_IMAGES, "heldout", seed=101)
    names = class_names("all")
    corpus = ShapesDataset(SEARCH_IMAGES, "all", seed=5)
    queries = [f"a photo of a {name}." for name in names] + \
        [ShapesDataset(CAPTION_QUERIES, "all", seed=9).caption(i) for i in range(CAPTION_QUERIES)]  # 248
    return {"heldout": _shapes_batches(preprocess, heldout), "names": names, "context_length": context_length,
            "labels": torch.tensor([names.index(heldout.class_name(i)) for i in range(len(heldout))]),
            "corpus": _shapes_batches(preprocess, corpus), "queries": tokenize(queries, context_length),
            "photos": photos(preprocess, 64), "captions": tokenize(captions(64), context_length, truncate=True)}


def _encode(encoder: dict, inputs: dict) -> dict[str, torch.Tensor]:
    batched = lambda fn, x: torch.cat([fn(x[i:i + 256]) for i in range(0, len(x), 256)])  # noqa: E731
    with torch.inference_mode():
        return {key: F.normalize(batched(encoder[tower], inputs[key]), dim=-1)
                for key, tower in (("heldout", "image"), ("corpus", "image"), ("photos", "image"),
                                   ("queries", "text"), ("captions", "text"))}


def _zeroshot_top1(text: Callable, images: torch.Tensor, inputs: dict) -> float:
    """Top-1 of the prompt-ensembled zero-shot classifier (OpenAI's recipe) whose prompts ``text`` encodes."""
    with torch.inference_mode():
        weights = torch.stack([F.normalize(F.normalize(text(tokenize(
            [fill_template(t, name) for t in templates()], inputs["context_length"])), dim=-1).mean(0), dim=0)
            for name in inputs["names"]])  # (classes, D)
    return ((images @ weights.T).argmax(-1) == inputs["labels"]).float().mean().item()


def quality_rows(spec: str, onnx: bool, label: str | None = None) -> list[dict[str, Any]]:
    """Int8 (PyTorch, and ONNX Runtime) against float32 on a trained model: cosines, zero-shot, search overlap."""
    fp32, preprocess = clipforge.load(spec, device="cpu")
    int8, _ = clipforge.load(spec, precision="int8")
    inputs = quality_inputs(preprocess, fp32.context_length)
    impls = {"clipforge int8": {"image": int8.encode_image, "text": int8.encode_text}}
    with tempfile.TemporaryDirectory() as tmp:
        if onnx and optional_import("onnxruntime") is not None:
            from clipforge.io.onnx import OnnxEncoder, export_onnx
            export_onnx(fp32, tmp, int8=True)
            session = OnnxEncoder(tmp, threads=torch.get_num_threads())
            impls[ONNX_INT8] = {"image": session.encode_image, "text": session.encode_text}
        reference = _encode({"image": fp32.encode_image, "text": fp32.encode_text}, inputs)
        top1 = _zeroshot_top1(fp32.encode_text, reference["heldout"], inputs)
        ref_top = (reference["queries"] @ reference["corpus"].T).topk(TOP_K).indices
        return [_quality_row(label or spec, impl, encoder, inputs, reference, top1, ref_top)
                for impl, encoder in impls.items()]


def _quality_row(case: str, impl: str, encoder: dict, inputs: dict, reference: dict, top1: float,
                 ref_top: torch.Tensor) -> dict[str, Any]:
    ours = _encode(encoder, inputs)
    row = {"bench": "int8 quality", "case": case, "impl": impl, "fp32_zeroshot_top1": top1}
    for key in ("heldout", "photos", "captions"):
        cos = (ours[key] * reference[key]).sum(-1)
        row[f"cos_{key}_mean"], row[f"cos_{key}_worst"] = cos.mean().item(), cos.min().item()
    row["zeroshot_top1_diff_points"] = 100 * (_zeroshot_top1(encoder["text"], ours["heldout"], inputs) - top1)
    top = (ours["queries"] @ ours["corpus"].T).topk(TOP_K).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / TOP_K for a, b in zip(top, ref_top)]
    row["top10_overlap_mean"], row["top10_overlap_worst"] = sum(overlap) / len(overlap), min(overlap)
    return row


def run(models: tuple[str, ...] = ("ViT-B-32", "ViT-L-14"), batch_sizes: tuple[int, ...] = (1, 64),
        repeats: int = 9, onnx: bool = True, train_steps: int = 400, quality_model: str | None = None,
        speed: bool = True, quality: bool = True, kernels: bool = False) -> list[dict[str, Any]]:
    """Speed rows per (model, tower, batch, implementation) and quality rows per int8 implementation."""
    print(f"cpu: {environment('cpu')['cpu']}; flags: {' '.join(cpu_flags())}; torch capability "
          f"{torch.backends.cpu.get_cpu_capability()}; threads: {torch.get_num_threads()}"
          + (f"; libraries capped at {isa_cap()} (bench/capped.py)" if isa_cap() else ""), flush=True)
    rows = run_kernels(repeats) if kernels else []
    rows += run_speed(models, batch_sizes, repeats, onnx) if speed else []
    if quality:
        with tempfile.TemporaryDirectory() as tmp:
            label = quality_model or f"tiny-vit trained {train_steps} steps"
            rows += quality_rows(quality_model or trained_model(train_steps, Path(tmp)), onnx, label)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        if r["bench"] == "int8 kernel":
            lines.append(f"{r['case']:<22} {r['impl']:<20} {r['value']:9.3f} ms  {r['vs_fp32']:.2f}x fp32")
        elif r["bench"] == "int8":
            ratio = "" if r["impl"] == "clipforge fp32" else \
                f"  {r['vs_fp32']:.2f}x fp32  cos mean {r['cos_mean']:.5f} worst {r['cos_worst']:.5f}"
            lines.append(f"{r['case']:<22} {r['impl']:<20} {r['value']:9.2f} {r['unit']}{ratio}")
        else:
            lines.append(f"{r['case']} {r['impl']}: " + ", ".join(
                f"{k} {v:.5f}" if k.startswith("cos") else f"{k} {v:.3f}"
                for k, v in r.items() if isinstance(v, float)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=9, help="timed calls at batch 1 (a third of them at larger)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime int8 export")
    parser.add_argument("--train-steps", type=int, default=400, help="training steps of the quality model")
    parser.add_argument("--quality-model", metavar="SPEC", help="a trained model to judge quality on instead")
    parser.add_argument("--parts", nargs="+", choices=("speed", "quality", "kernels"),
                        default=["speed", "quality"])
    parser.add_argument("--quick", action="store_true", help="ViT-B/32 only, 3 repeats, 150 training steps")
    parser.add_argument("--threads", type=int, help="torch's (and ONNX Runtime's) threads (default: torch's)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.repeats, args.train_steps = ["ViT-B-32"], 3, 150
    print(json.dumps(environment("cpu")))
    rows = run(tuple(args.models), tuple(args.batch_sizes), args.repeats, not args.no_onnx, args.train_steps,
               args.quality_model, "speed" in args.parts, "quality" in args.parts, "kernels" in args.parts)
    print("\n" + format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
