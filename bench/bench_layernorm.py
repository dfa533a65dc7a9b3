"""A/B of clipforge's LayerNorm in half-precision models: fp32 round trip (as shipped) vs the native kernel.

``clipforge.models.layers.LayerNorm`` casts its input to float32 and back so that it stays exact under
autocast. In a model whose weights are bf16/fp16 (``clipforge.load`` on CUDA, ``precision="bf16"``) the
native kernel already accumulates in float32, and the casts cost two extra passes per LayerNorm. This
script times image and text encoding both ways on the same weights and prints the ratio and the largest
feature difference, so the choice rests on a measurement.
Usage: ``python bench/bench_layernorm.py [--model ViT-B-32] [--dtype bf16] [--batch-sizes 1 64 256]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import DTYPES, compare_outputs, environment, time_interleaved  # noqa: E402

from clipforge.io.onnx import example_images  # noqa: E402
from clipforge.models import CLIP, get_model_config  # noqa: E402
from clipforge.models.layers import LayerNorm  # noqa: E402


@contextmanager
def native_layernorm():
    """LayerNorm.forward as one native call when input and weights share a dtype (else as shipped)."""
    shipped = LayerNorm.forward

    def native(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.weight.dtype != x.dtype:
            return shipped(self, x)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    LayerNorm.forward = native
    try:
        yield
    finally:
        LayerNorm.forward = shipped


def run(model_name: str, dtype: str, device: str, batch_sizes: tuple[int, ...], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = CLIP(get_model_config(model_name)).eval().to(device=device, dtype=DTYPES[dtype])
    tokens = torch.randint(1, 49406, (max(batch_sizes), model.context_length), device=device)
    tokens[:, -1] = 49407  # end-of-text last: every position is computed
    rows = []
    for batch in batch_sizes:
        images = example_images(model.config, batch).to(device=device, dtype=DTYPES[dtype])
        for tower, fn, x in (("image", model.encode_image, images), ("text", model.encode_text, tokens[:batch])):
            def native_fn(fn=fn, x=x):
                with native_layernorm():
                    return fn(x)
            with torch.inference_mode():
                shipped_out, native_out = fn(x), native_fn()
                seconds = time_interleaved({"fp32 round trip": lambda fn=fn, x=x: fn(x), "native": native_fn},
                                           repeats, warmup=2, device=device)
            rows.append({"case": f"{model_name} {tower} {dtype} b{batch}",
                         "fp32_round_trip_s": seconds["fp32 round trip"], "native_s": seconds["native"],
                         "native_speedup": seconds["fp32 round trip"] / seconds["native"],
                         "max_rel_diff": compare_outputs(shipped_out, native_out, 1.0)[0]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64, 256])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    print(json.dumps(environment(args.device)))
    rows = run(args.model, args.dtype, args.device, tuple(args.batch_sizes), args.repeats)
    for r in rows:
        print(f"{r['case']:<28} fp32 round trip {1e3 * r['fp32_round_trip_s']:8.2f} ms   native "
              f"{1e3 * r['native_s']:8.2f} ms   native speed-up {r['native_speedup']:.2f}x   "
              f"max rel diff {r['max_rel_diff']:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
