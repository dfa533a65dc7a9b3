"""Encoding throughput: clipforge vs OpenCLIP vs Hugging Face transformers on the same weights and inputs.

clipforge's model is built with random weights; its OpenAI-layout state dict is loaded strictly into
OpenCLIP's model (its config registered from ours) and, converted by ``clipforge.io.hf``, into
transformers' ``CLIPModel`` (ViT only: ResNets have no transformers equivalent). ``clipforge-onnx``
is the same model exported with ``clipforge.io.onnx`` and run by ONNX Runtime (CPU, fp32, as many
threads as torch uses). On a GPU in bf16/fp16, clipforge runs with SDPA's flash-attention kernel
only; the references keep PyTorch's own kernel choice (their masked text attention cannot use flash).
Usage: ``python bench/bench_encode.py [--models ViT-B-32 RN50] [--batch-sizes 1 64] [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import DTYPES, add_ratios, compare_outputs, count_flops, environment, report, \
    matmul_peak_gflops, optional_import, row, time_interleaved  # noqa: E402

from clipforge.io.onnx import example_images  # noqa: E402
from clipforge.models import CLIP, CLIPConfig, get_model_config  # noqa: E402
from clipforge.models.text import cut_after_end_of_text  # noqa: E402

Encoders = dict[str, Callable[[torch.Tensor], torch.Tensor]]
RTOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}


def open_clip_model(config: CLIPConfig, name: str):
    """OpenCLIP's model for ``config`` (registered in its config table under a clipforge- name), or None."""
    open_clip = optional_import("open_clip")
    if open_clip is None:
        return None
    schema = config.to_dict()
    schema["text_cfg"].pop("encoder")  # clipforge-only key; "transformer" is OpenCLIP's only text tower
    key = f"clipforge-{name}"
    open_clip.factory._MODEL_CONFIGS[key] = schema
    return open_clip.create_model(key, pretrained=None)


def hf_model(model: CLIP):
    """transformers' ``CLIPModel`` holding ``model``'s weights, or None (no transformers, or a ResNet)."""
    transformers = optional_import("transformers")
    if transformers is None or model.config.vision_cfg.is_resnet or model.config.text_cfg.encoder != "transformer":
        return None
    from clipforge.io.hf import config_to_hf, openai_to_hf
    hf = transformers.CLIPModel(transformers.CLIPConfig(**config_to_hf(model.config, model.logit_scale.item())))
    hf.load_state_dict(openai_to_hf(model.state_dict()), strict=True)
    return hf


def _flash(fn: Callable, device: str, dtype: str) -> Callable:
    """``fn`` restricted to SDPA's flash-attention kernel (CUDA, half precision), so a fallback cannot hide."""
    if not device.startswith("cuda") or dtype == "fp32":
        return fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash_only(x: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return fn(x)
    return flash_only


def _pooled(output: Any) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.pooler_output  # transformers 5 returns a ModelOutput


def build_encoders(name: str, device: str, dtype: str, onnx_dir: Path | None) -> dict[str, dict[str, Encoders]]:
    """``{impl: {"image": fn, "text": fn}}`` for every implementation available, all on the same weights."""
    torch.manual_seed(0)
    model = CLIP(get_model_config(name)).eval()
    impls: dict[str, dict[str, Encoders]] = {}
    oc, hf = open_clip_model(model.config, name), hf_model(model)
    if oc is not None:
        oc.load_state_dict(model.state_dict(), strict=True)
    if onnx_dir is not None and dtype == "fp32" and device == "cpu" and optional_import("onnxruntime"):
        from clipforge.io.onnx import OnnxEncoder, export_onnx
        export_onnx(model, onnx_dir / name)
        onnx = OnnxEncoder(onnx_dir / name, threads=torch.get_num_threads())  # the threads torch has
        impls["clipforge-onnx"] = {"image": onnx.encode_image, "text": onnx.encode_text}
    model = model.to(device=device, dtype=DTYPES[dtype])
    impls["clipforge"] = {"image": _flash(model.encode_image, device, dtype),
                          "text": _flash(model.encode_text, device, dtype)}
    if oc is not None:
        oc = oc.to(device=device, dtype=DTYPES[dtype]).eval()
        impls["open_clip"] = {"image": oc.encode_image, "text": oc.encode_text}
    if hf is not None:
        hf = hf.to(device=device, dtype=DTYPES[dtype]).eval()
        impls["transformers"] = {"image": lambda x: _pooled(hf.get_image_features(pixel_values=x)),
                                 "text": lambda t: _pooled(hf.get_text_features(input_ids=t))}
    return dict(sorted(impls.items(), key=lambda kv: kv[0] != "clipforge"))  # clipforge eager first


def _texts(kind: str, batch: int) -> list[str]:
    """``batch`` deterministic texts: web-like captions (the tokenizer benchmark's) or zero-shot prompts
    ("a photo of a {c}." over ImageNet's classes and OpenAI's 80 templates, in a seeded shuffle)."""
    if kind == "captions":
        from bench_tokenizer import make_captions
        return make_captions(batch, seed=1)
    from clipforge.data import load_classnames
    from clipforge.zeroshot import fill_template, load_templates
    prompts = [fill_template(t, c) for c in load_classnames("imagenet1k") for t in load_templates("imagenet1k")]
    return random.Random(0).sample(prompts, batch)


def _inputs(config: CLIPConfig, tower: str, batch: int, device: str, dtype: str) -> torch.Tensor:
    """Images, or the token rows (padded to the context length, as every CLIP tokenizer pads) of texts."""
    if tower == "image":
        return example_images(config, batch).to(device=device, dtype=DTYPES[dtype])
    from clipforge.tokenizer import tokenize
    return tokenize(_texts(tower.split()[1], batch), config.text_cfg.context_length).to(device)


def _padded_to_longest(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` on token rows cut after the batch's longest text: what transformers' tokenizer gives with
    ``padding=True``, shown beside the 77-token input every implementation gets."""
    def trimmed(tokens: torch.Tensor) -> torch.Tensor:
        return fn(cut_after_end_of_text(tokens))
    return trimmed


def bench_case(name: str, impls: dict[str, dict[str, Encoders]], tower: str, batch: int, dtype: str,
               device: str, repeats: int, peak: float | None) -> list[dict[str, Any]]:
    """Time one (model, tower, batch, dtype) case for every implementation; check outputs against clipforge."""
    config = get_model_config(name)
    x = _inputs(config, tower, batch, device, dtype)
    kind = tower.split()[0]
    fns = {impl: (lambda f=towers[kind]: f(x)) for impl, towers in impls.items()}
    if kind == "text" and "transformers" in impls:
        fns["transformers padding=longest"] = lambda f=_padded_to_longest(impls["transformers"]["text"]): f(x)
    with torch.inference_mode():
        outputs = {impl: fn() for impl, fn in fns.items()}
        # FLOPs of the work the task needs (a text up to its end-of-text), so every row's % of peak is comparable
        sample = x if kind == "text" else x[:1]
        flops = count_flops(lambda: impls["clipforge"][kind](sample)) / len(sample)
        seconds = time_interleaved(fns, repeats, warmup=1, device=device)
    unit = "img/s" if kind == "image" else "txt/s"
    case = f"{name} {tower} {dtype} b{batch}"
    rows = []
    for impl, secs in seconds.items():
        check = "" if impl == "clipforge" else compare_outputs(outputs["clipforge"], outputs[impl], RTOL[dtype])[1]
        rows.append(row("encode", case, impl, secs, batch, unit, flops, peak, check=check))
    return rows


def run(models: tuple[str, ...] = ("ViT-B-32", "RN50"), batch_sizes: tuple[int, ...] = (1, 64),
        dtypes: tuple[str, ...] = ("fp32",), device: str = "cpu", repeats: int = 5, onnx: bool = True,
        peaks: dict[str, float] | None = None, towers: tuple[str, ...] = ("image", "text captions", "text prompts"),
        cpu_bf16_batch: int = 1) -> list[dict[str, Any]]:
    """Rows of images/s and texts/s per model, tower, dtype and batch size, for every implementation.

    bf16 on a CPU runs only at ``cpu_bf16_batch`` with one repeat (it is there to check outputs and
    give an idea, not a figure to tune). ``peaks`` (dtype -> matmul GFLOP/s) give each row its
    fraction of the peak.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for dtype in dtypes:
                impls = build_encoders(name, device, dtype, Path(tmp) if onnx else None)
                cpu_low = device == "cpu" and dtype != "fp32"
                for tower in towers:
                    for batch in ((cpu_bf16_batch,) if cpu_low else batch_sizes):
                        rows += bench_case(name, impls, tower, batch, dtype, device,
                                           1 if cpu_low else repeats, (peaks or {}).get(dtype))
                del impls
    return add_ratios(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "RN50"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime backend")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    peaks = {"fp32": matmul_peak_gflops(args.device)}
    print(json.dumps(environment(args.device)), f"\nfp32 matmul peak: {peaks['fp32']:.0f} GFLOP/s")
    rows = run(tuple(args.models), tuple(args.batch_sizes), tuple(args.dtypes), args.device, args.repeats,
               not args.no_onnx, peaks)
    report(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
