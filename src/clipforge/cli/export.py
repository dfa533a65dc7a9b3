"""``clipforge export``: write a model's encoders as ONNX graphs, or the model as a Hugging Face folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipforge.io.factory import create_model, load
from ..models import CLIP
from ..models.registry import canonical_name
from clipforge.io.pretrained import pretrained_weights
from ..transforms import PreprocessConfig

HELP = """Export a model for other runtimes.

onnx: image_encoder.onnx (float32 images (N, 3, H, W) -> features) and text_encoder.onnx (int64 or int32
      tokens (N, L <= context_length) -> features), batch axis dynamic, plus onnx_config.json, which
      describes the preprocessing, tokenizer files, context length and trained logit scale (also stored
      as metadata in each .onnx). Both graphs are run with ONNX Runtime after export and must match
      PyTorch within --atol. Load them with clipforge.io.onnx.OnnxEncoder(folder), or from any language.
      Needs the onnx extra: pip install 'clipforge[onnx]'.
hf:   a Hugging Face transformers CLIPModel folder (config.json + model.safetensors, tokenizer files and
      preprocessor_config.json): CLIPProcessor, AutoTokenizer and pipeline() load it as is; ViT models only."""

EXAMPLES = """examples:
  clipforge export onnx --model ViT-B/32 --output exported/vit-b-32
  clipforge export onnx --model runs/tiny --output exported/tiny
  clipforge export onnx --model tiny-vit --random-init --output /tmp/tiny-onnx
  clipforge export hf --model ViT-B/32 --output exported/vit-b-32-hf"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("format", choices=["onnx", "hf"], help="what to write")
    parser.add_argument("--model", required=True, metavar="NAME|PATH",
                        help="a model name with published weights (ViT-B/32, RN50, ...), a checkpoint file or "
                             "folder, a training run directory, or (with --random-init) any architecture "
                             "name or JSON config")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write into (created)")
    parser.add_argument("--random-init", action="store_true",
                        help="build the architecture with random weights instead of loading any (tests, benchmarks)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed ONNX-vs-PyTorch feature difference (default 1e-4)")
    parser.add_argument("--no-verify", action="store_true", help="skip running the ONNX graphs after export")


def run(args: argparse.Namespace) -> int:
    model, preprocess = load_model(args.model, args.random_init)
    if args.format == "hf":
        from clipforge.io.checkpoints import export_hf
        print(f"wrote {export_hf(model, args.output, preprocess)}")
        return 0
    from clipforge.io.onnx import export_onnx
    paths = export_onnx(model, args.output, opset=args.opset, verify=not args.no_verify, atol=args.atol,
                        preprocess=preprocess)
    for name in ("image", "text", "config"):
        print(f"wrote {paths[name]}")
    diffs = json.loads(paths["config"].read_text()).get("max_difference")
    if diffs:
        print("verified with ONNX Runtime: largest difference from PyTorch "
              + ", ".join(f"{name} {value:.1e}" for name, value in diffs.items()))
    return 0


def load_model(spec: str, random_init: bool = False) -> tuple[CLIP, PreprocessConfig | None]:
    """The model ``--model`` names and its preprocessing: loaded weights, or with ``random_init`` a
    random-init architecture (preprocessing None: OpenAI's at the model's size)."""
    path = Path(spec).expanduser()
    if random_init:
        return create_model(spec), None
    if path.suffix == ".json" and path.is_file():
        raise ValueError(f"{spec} is an architecture config without weights; pass --random-init to export it "
                         f"with random weights, or give a checkpoint")
    if path.exists() or pretrained_weights(spec) is not None:
        model, transform = load(spec, device="cpu", precision="fp32")
        return model, transform.config
    if canonical_name(spec) is not None:
        raise ValueError(f"{spec!r} is an architecture without published weights; pass a checkpoint path, "
                         f"or --random-init to export it with random weights")
    raise FileNotFoundError(f"--model {spec!r} is neither an existing file or folder nor a known model name")
