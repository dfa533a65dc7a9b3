"""CLIP's optimiser (Radford et al. 2021, sec. 2.5): AdamW with decoupled weight decay on the weight
matrices only, and a cosine learning-rate schedule after a linear warm-up (Loshchilov & Hutter 2016).
"""
from __future__ import annotations

import math

import torch
from torch import nn

# Parameters named like this are embeddings (token, positional, class) and take no weight decay.
_EMBEDDING_NAMES = ("token_embedding.weight", "positional_embedding", "class_embedding")
# The paper's AdamW settings; the run configuration's defaults are these.
ADAMW_BETAS = (0.9, 0.98)
ADAMW_EPS = 1e-6
ADAMW_WEIGHT_DECAY = 0.2


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: matrices and kernels (>= 2-D) that are not embeddings.

    Gains and biases (1-D), the learned temperature ``logit_scale`` (0-D) and the token, positional
    and class embeddings are not decayed.
    """
    return param.ndim >= 2 and not name.endswith(_EMBEDDING_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: ``weight_decay`` on ``decays`` ones, 0 on the rest."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (both towers locked?)")
    decayed = [p for n, p in trainable if decays(n, p)]
    others = [p for n, p in trainable if not decays(n, p)]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = ADAMW_WEIGHT_DECAY,
                    betas: tuple[float, float] = ADAMW_BETAS, eps: float = ADAMW_EPS) -> torch.optim.AdamW:
    """AdamW with the paper's defaults (``ADAMW_*``) over ``param_groups``.

    Uses the fused kernel (one pass over all parameters) where torch has one for the parameters' device.
    """
    groups = param_groups(model, weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


# Peak learning rates at reference global batches: the paper's from-scratch value (Radford et al. 2021,
# table 19-20: 5e-4 for RN50 to ViT-L/14 at batch 32768) and WiSE-FT's fine-tuning of CLIP (Wortsman et al.
# 2022: 3e-5 at batch 512).
SCRATCH_LR, SCRATCH_BATCH = 5e-4, 32768
FINETUNE_LR, FINETUNE_BATCH = 3e-5, 512
WARMUP_FRACTION = 0.1


def fitted_lr(global_batch: int, pretrained: bool) -> float:
    """Peak learning rate for a run with no ``--lr``: the reference value, scaled up by the square root of
    the batch ratio for batches above the reference (the scaling rule for Adam, Malladi et al. 2022) and
    kept below it: on the built-in data at batch 32 a smaller rate trained worse (README, Training on a
    small dataset). Pretrained weights start from the fine-tuning reference."""
    lr, batch = (FINETUNE_LR, FINETUNE_BATCH) if pretrained else (SCRATCH_LR, SCRATCH_BATCH)
    return lr * math.sqrt(max(1.0, global_batch / batch))


def fitted_warmup(total_steps: int, beta2: float = ADAMW_BETAS[1]) -> int:
    """Warm-up steps for a run with no ``--warmup``: ``2 / (1 - beta2)``, the untuned warm-up that Adam's
    second-moment estimate needs (Ma & Yarats 2021; 100 steps at beta2 = 0.98), but at most a tenth of
    the run so that a short run spends most of its steps at a useful learning rate."""
    return max(1, min(round(2 / (1 - beta2)), int(WARMUP_FRACTION * total_steps)))


def cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based).

    Linear warm-up ``base_lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then a
    cosine decay from ``base_lr`` (at ``step == warmup_steps``) towards 0 at ``step == total_steps``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


class CosineSchedule:
    """Sets every parameter group's learning rate to ``cosine_lr`` of the current step.

    Stateless apart from its settings: the step to resume from comes from the checkpoint's step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup_steps: int, total_steps: int):
        self.optimizer = optimizer
        self.base_lr, self.warmup_steps, self.total_steps = base_lr, warmup_steps, total_steps

    def set_step(self, step: int) -> float:
        """Apply the learning rate of optimiser step ``step`` (0-based) and return it."""
        lr = cosine_lr(step, self.base_lr, self.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.base_lr, self.warmup_steps, self.total_steps = (
            state["base_lr"], state["warmup_steps"], state["total_steps"])
