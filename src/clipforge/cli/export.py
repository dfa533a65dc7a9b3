"""``clipforge export``: write a model's encoders as ONNX graphs, or the model as a Hugging Face folder."""
from __future__ import annotations

import argparse
import json

from clipforge.cli.options import add_model_options
from clipforge.io.factory import build_from_spec, load
from clipforge.io.spec import resolve_spec
from clipforge.models import CLIP
from clipforge.transforms import PreprocessConfig

HELP = """Export a model for other runtimes.

onnx: image_encoder.onnx (float32 images (N, 3, H, W) -> features) and text_encoder.onnx (int64 or int32
      tokens (N, L <= context_length) -> features), batch axis dynamic, plus onnx_config.json, which
      describes the preprocessing, tokenizer files, context length and trained logit scale (also stored
      as metadata in each .onnx). Both graphs are run with ONNX Runtime after export and must match
      PyTorch within --atol. Load them with clipforge.io.onnx.OnnxEncoder(folder), or from any language.
      --int8 quantises both graphs with ONNX Runtime's dynamic quantiser (int8 weights, activations
      quantised at run time, in the Transformer blocks; onnx_config.json says "precision": "int8"):
      about a quarter of the blocks' bytes and faster on CPUs; verified by the cosine (at least 0.99)
      between its features and PyTorch's float32 ones instead of --atol.
      Needs the onnx extra: pip install 'clipforge[onnx]'.
hf:   a Hugging Face transformers CLIPModel folder (config.json + model.safetensors, tokenizer files and
      preprocessor_config.json): CLIPProcessor, AutoTokenizer and pipeline() load it as is; ViT models only."""

EXAMPLES = """examples:
  clipforge export onnx --model ViT-B/32 --output exported/vit-b-32
  clipforge export onnx --model runs/tiny --output exported/tiny
  clipforge export onnx --model tiny-vit --random-init --output /tmp/tiny-onnx
  clipforge export onnx --model ViT-B/32 --int8 --output exported/vit-b-32-int8
  clipforge export hf --model ViT-B/32 --output exported/vit-b-32-hf"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("format", choices=["onnx", "hf"], help="what to write")
    add_model_options(parser)
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write into (created)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed ONNX-vs-PyTorch feature difference (default 1e-4)")
    parser.add_argument("--no-verify", action="store_true", help="skip running the ONNX graphs after export")
    parser.add_argument("--int8", action="store_true",
                        help="onnx: quantise both graphs to int8 with ONNX Runtime's dynamic quantiser (see above)")


def run(args: argparse.Namespace) -> int:
    if args.int8 and args.format != "onnx":
        raise ValueError("--int8 applies to the onnx format only (a Hugging Face folder holds float weights)")
    model, preprocess = load_model(args.model, args.random_init, args.pretrained)
    if args.format == "hf":
        from clipforge.io.hf import export_hf
        print(f"wrote {export_hf(model, args.output, preprocess)}")
        return 0
    from clipforge.io.onnx import export_onnx
    paths = export_onnx(model, args.output, opset=args.opset, verify=not args.no_verify, atol=args.atol,
                        preprocess=preprocess, int8=args.int8)
    for name in ("image", "text", "config"):
        print(f"wrote {paths[name]}")
    meta = json.loads(paths["config"].read_text())
    if meta.get("min_cosine"):
        print("verified with ONNX Runtime: int8 features' lowest cosine to PyTorch's float32 ones "
              + ", ".join(f"{name} {value:.4f}" for name, value in meta["min_cosine"].items()))
    elif meta.get("max_difference"):
        print("verified with ONNX Runtime: largest difference from PyTorch "
              + ", ".join(f"{name} {value:.1e}" for name, value in meta["max_difference"].items()))
    return 0


def load_model(spec: str, random_init: bool = False,
               pretrained: str | None = None) -> tuple[CLIP, PreprocessConfig | None]:
    """The model ``--model`` names (by the model-spec rule, ``clipforge.io.spec``) and its preprocessing:
    loaded weights, or with ``random_init`` the architecture (a name or JSON config) with seed-0 random
    weights (preprocessing None: OpenAI's at the model's size). Float32, on the CPU."""
    resolved = resolve_spec(spec, pretrained, random_init)
    if resolved.random_init:
        return build_from_spec(resolved)[0], None
    model, transform = load(resolved, device="cpu", precision="fp32")
    return model, transform.config
