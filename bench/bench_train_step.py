"""Training-step throughput: clipforge vs OpenCLIP on one architecture, batch, loss and optimiser recipe.

One step = forward of both towers, the symmetric contrastive loss, backward and an AdamW update, each
library as its own training loop does it: clipforge's ``Stepper`` (``clipforge.loss.contrastive_loss``,
``build_optimizer``'s fused AdamW, gradient norm, logit-scale clamp) and OpenCLIP's ``train_one_epoch``
recipe (``ClipLoss``, ``torch.optim.AdamW`` with its parameter groups, logit-scale clamp). Both start
from the same weights. Model FLOPs per step are counted with ``FlopCounterMode``; their rate over
the measured matmul peak is the model-FLOPs utilisation.
Usage: ``python bench/bench_train_step.py [--model bench/train_step_config.json] [--batch-size 256]``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import add_ratios, count_flops, environment, matmul_peak_gflops, optional_import, report, \
    row, time_interleaved  # noqa: E402

from bench_encode import open_clip_model  # noqa: E402
from clipforge.io.onnx import example_images, example_tokens  # noqa: E402
from clipforge.models import CLIP, get_model_config  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "train_step_config.json"
LR = 5e-4


def _autocast(device: str, precision: str) -> Callable:
    if precision == "fp32":
        return nullcontext
    return lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


def clipforge_step(model: CLIP, device: str, precision: str,
                   compile: bool = False) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """clipforge's own training step (``clipforge.train.step.Stepper``) for ``model``."""
    from clipforge.train.optim import build_optimizer
    from clipforge.train.step import Stepper, TrainingLoss, TrainModule
    module = TrainModule(model)
    wrapped = torch.compile(module) if compile else module  # what clipforge's loop does with --compile
    stepper = Stepper(module, wrapped, build_optimizer(module, LR), TrainingLoss(gather=False),
                      torch.amp.GradScaler(device.split(":")[0], enabled=False), _autocast(device, precision))
    return lambda images, tokens: stepper.step([(images, tokens)])


def open_clip_step(model, device: str, precision: str,
                   compile: bool = False) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """OpenCLIP's training step as ``open_clip_train.train.train_one_epoch`` runs it (no accumulation)."""
    from open_clip.loss import ClipLoss

    from clipforge.train.optim import ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY
    forward = torch.compile(model) if compile else model  # open_clip_train's --torchcompile
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [p for n, p in named if not exclude(n, p)]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                   {"params": decayed, "weight_decay": ADAMW_WEIGHT_DECAY}],
                                  lr=LR, betas=ADAMW_BETAS, eps=ADAMW_EPS)
    loss_fn, autocast = ClipLoss(), _autocast(device, precision)

    def step(images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        with autocast():
            image_features, text_features, scale = forward(images, tokens)
            loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()
    return step


def _flops_per_step(model: CLIP, images: torch.Tensor, tokens: torch.Tensor, precision: str, device: str) -> int:
    from clipforge.loss import contrastive_loss

    def forward_backward() -> None:
        with _autocast(device, precision)():
            loss = contrastive_loss(model.encode_image(images, normalize=True),
                                    model.encode_text(tokens, normalize=True), model.logit_scale.exp())
        loss.backward()
    flops = count_flops(forward_backward)
    model.zero_grad(set_to_none=True)
    return flops


def run(model_name: str | Path = CONFIG, batch_size: int = 256, device: str = "cpu", repeats: int = 3,
        precision: str = "fp32", peak: float | None = None, compile: bool = False) -> list[dict[str, Any]]:
    """Rows of samples/s (and fraction of ``peak`` GFLOP/s) for clipforge and, if importable, OpenCLIP.

    ``precision``: "fp32", or "bf16" for bf16 autocast with fp32 weights (mixed precision, GPU).
    ``compile=True`` wraps each library's model in ``torch.compile`` (as both training loops offer).
    """
    config = get_model_config(model_name)
    label = _label(model_name)
    torch.manual_seed(0)
    model = CLIP(config).to(device).train()
    images = example_images(config, batch_size).to(device)
    tokens = example_tokens(config, batch_size).to(device)
    flops = _flops_per_step(model, images, tokens, precision, device)
    libraries = ("clipforge", "open_clip") if optional_import("open_clip") else ("clipforge",)
    steps = {library: _bind(library_step(library, model, device, precision, compile), images, tokens)
             for library in libraries}
    first_loss = {impl: float(_loss(step())) for impl, step in steps.items()}  # same weights, same batch
    seconds = time_interleaved(steps, repeats, warmup=1 if compile else 0, device=device)
    case = f"{label} {precision} b{batch_size}" + (" compiled" if compile else "")
    return _rows(case, seconds, first_loss, batch_size, flops, peak, precision)


def library_step(library: str, model: CLIP, device: str, precision: str,
                 compile: bool = False) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """``library``'s training step ("clipforge" or "open_clip") starting from ``model``'s weights."""
    if library == "clipforge":
        return clipforge_step(model, device, precision, compile)
    oc = open_clip_model(model.config, "train-step")
    oc.load_state_dict(model.state_dict(), strict=True)
    return open_clip_step(oc.to(device).train(), device, precision, compile)


def _rows(case: str, seconds: dict[str, float], first_loss: dict[str, float], batch_size: int, flops: int,
          peak: float | None, precision: str) -> list[dict[str, Any]]:
    rows = [row("train_step", case, impl, secs, batch_size, "samples/s", flops / batch_size, peak,
                step_seconds=round(secs, 4), check=_loss_check(first_loss, impl, precision))
            for impl, secs in seconds.items()]
    return add_ratios(rows)


def _loss(out: Any) -> torch.Tensor:
    return out["loss"] if isinstance(out, dict) else out


def _loss_check(first_loss: dict[str, float], impl: str, precision: str) -> str:
    """The first step's loss, compared with clipforge's (both start from the same weights and batch)."""
    if impl == "clipforge":
        return f"loss {first_loss[impl]:.5f}"
    diff = abs(first_loss[impl] - first_loss["clipforge"]) / abs(first_loss["clipforge"])
    tolerance = 1e-4 if precision == "fp32" else 1e-2
    return f"{'ok' if diff < tolerance else 'DIFF'} loss {first_loss[impl]:.5f}"


# Each library's training step alone in a fresh process, as its own training script would run it: clipforge
# with the allocator setting its trainer applies (clipforge.runtime.allocator), OpenCLIP with glibc's defaults,
# and clipforge with glibc's defaults too, so the library's and the setting's shares can be told apart.
OWN_PROCESS = {"clipforge": ("clipforge", True), "clipforge glibc-default malloc": ("clipforge", False),
               "open_clip": ("open_clip", False)}


def run_own_processes(model_name: str | Path = CONFIG, batch_size: int = 256, repeats: int = 2, rounds: int = 1,
                      peak: float | None = None) -> list[dict[str, Any]]:
    """CPU fp32 rows of samples/s with every implementation in its own child process, in turn ``rounds``
    times (median of all its steps). In one shared process the allocator's state left by one library's
    step changes the next one's page faults, so these figures are the ones a training run sees."""
    import subprocess
    config = get_model_config(model_name)
    label = _label(model_name)
    torch.manual_seed(0)
    images, tokens = example_images(config, batch_size), example_tokens(config, batch_size)
    flops = _flops_per_step(CLIP(config).train(), images, tokens, "fp32", "cpu")
    impls = {k: v for k, v in OWN_PROCESS.items() if v[0] != "open_clip" or optional_import("open_clip")}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    losses: dict[str, float] = {}
    for _ in range(rounds):
        for impl, (library, retain) in impls.items():
            out = subprocess.run([sys.executable, __file__, "--child", library, "--model", str(model_name),
                                  "--batch-size", str(batch_size), "--repeats", str(repeats)]
                                 + (["--retain-freed-memory"] if retain else []),
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            times[impl] += result["seconds"]
            losses[impl] = result["loss"]
    seconds = {impl: statistics.median(ts) for impl, ts in times.items()}
    return _rows(f"{label} fp32 b{batch_size} own process", seconds, losses, batch_size, flops, peak, "fp32")


def _child(library: str, model_name: str, batch_size: int, repeats: int, retain: bool) -> None:
    """Run in a child process: one warm-up step and ``repeats`` timed steps; print their seconds as JSON."""
    import time
    if retain:
        from clipforge.runtime.allocator import retain_freed_memory
        if not retain_freed_memory():
            raise SystemExit("retain_freed_memory() did not apply on this platform")
    config = get_model_config(model_name)
    torch.manual_seed(0)
    model = CLIP(config).train()
    images, tokens = example_images(config, batch_size), example_tokens(config, batch_size)
    step = library_step(library, model, "cpu", "fp32")
    del model  # clipforge's step keeps it; OpenCLIP's holds its own copy of the weights
    loss = float(_loss(step(images, tokens)))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(images, tokens)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds, "loss": loss}))


def _label(model_name: str | Path) -> str:
    """A case name for ``model_name``: a JSON config's file stem, or the registered name."""
    return Path(model_name).stem if str(model_name).endswith(".json") else str(model_name)


def _bind(step: Callable, images: torch.Tensor, tokens: torch.Tensor) -> Callable[[], Any]:
    return lambda: step(images, tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(CONFIG), help="registered name or OpenCLIP-schema JSON")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--own-process", action="store_true",
                        help="CPU: also time each library in its own child process (see run_own_processes)")
    parser.add_argument("--child", choices=["clipforge", "open_clip"], help=argparse.SUPPRESS)
    parser.add_argument("--retain-freed-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.model, args.batch_size, args.repeats, args.retain_freed_memory)
        return 0
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak_gflops(args.device, dtype)
    print(json.dumps(environment(args.device)), f"\n{args.precision} matmul peak: {peak:.0f} GFLOP/s")
    rows = run(args.model, args.batch_size, args.device, args.repeats, args.precision, peak, args.compile)
    if args.own_process and args.device == "cpu" and args.precision == "fp32":
        rows += run_own_processes(args.model, args.batch_size, args.repeats, peak=peak)
    report(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
