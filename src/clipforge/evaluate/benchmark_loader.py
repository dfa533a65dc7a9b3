"""A model loader for LAION's CLIP_benchmark, whose ``clip_benchmark.models.load_clip`` dispatches on
``--model_type`` to functions ``(model_name, pretrained, cache_dir, device) -> (model, transform, tokenizer)``.

Register it and run the benchmark's own command line in one process::

    python -m clipforge.evaluate.benchmark_loader eval --model_type clipforge --model ViT-B-32 \
        --pretrained openai --dataset cifar10
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from clipforge.io.factory import load
from clipforge.tokenizer import Tokenizer, model_tokenizer

MODEL_TYPE = "clipforge"
_NO_WEIGHTS = (None, "", "none", "None")


def load_clipforge(model_name: str, pretrained: str | None = None, cache_dir: str | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Callable, Tokenizer]:
    """``(model, transform, tokenizer)`` as CLIP_benchmark expects: the model has ``encode_image`` and
    ``encode_text``, ``transform`` maps a PIL image to a (3, H, W) tensor and ``tokenizer(texts)`` returns ids.

    ``model_name`` and ``pretrained`` follow the model-spec rule of every clipforge command
    (``clipforge.io.spec``), as ``--model`` and ``--pretrained``: ``pretrained`` is an OpenCLIP tag of
    ``model_name`` ('openai', 'laion2b_s34b_b79k'; downloaded into ``cache_dir``) or a checkpoint loaded into
    that architecture; with no ``pretrained`` (``""``/``"none"``) ``model_name`` is a name with weights, ``ARCH:TAG``,
    a saved model or run directory, or ``RUN@best``. An architecture without weights is refused.
    """
    pretrained = None if pretrained in _NO_WEIGHTS else pretrained
    model, transform = load(model_name, device=device, download_root=cache_dir, precision="fp32",
                            pretrained=pretrained)
    return model, transform, model_tokenizer(model)


def register_with_clip_benchmark(model_type: str = MODEL_TYPE) -> None:
    """Add ``load_clipforge`` to CLIP_benchmark's loaders, so ``--model_type clipforge`` selects it."""
    try:
        import clip_benchmark.models as benchmark_models
    except ImportError as e:
        raise RuntimeError("CLIP_benchmark is not installed: pip install clip_benchmark") from e
    benchmark_models.TYPE2FUNC[model_type] = load_clipforge
    if model_type not in benchmark_models.MODEL_TYPES:
        benchmark_models.MODEL_TYPES.append(model_type)


def main() -> int:
    """Run CLIP_benchmark's command line (arguments from ``sys.argv``) with the clipforge loader registered."""
    register_with_clip_benchmark()
    from clip_benchmark.cli import main as benchmark_main
    return benchmark_main() or 0


if __name__ == "__main__":
    sys.exit(main())
