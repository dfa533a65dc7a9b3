"""A ``timm`` image tower, as OpenCLIP's ``TimmModel``: the timm network without its classifier (``trunk``),
pooled as ``timm_pool`` says, then a linear or MLP projection into the joint space (``head``).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from clipforge.models.config import VisionConfig


def require_timm():
    """The ``timm`` module, or an ImportError naming the extra (timm itself needs torchvision)."""
    try:
        import timm
    except ImportError as e:
        raise ImportError("a timm image tower (vision_cfg.timm_model_name) needs timm, which needs torchvision: "
                          f"pip install 'clipforge[timm]' ({e})") from e
    return timm


def _create_trunk(timm, cfg: VisionConfig) -> nn.Module:
    """The timm network with random weights, timm's published ones (``timm_model_pretrained: true``) or a
    local checkpoint file (``timm_model_pretrained: "path/to/file"``)."""
    kwargs = {} if cfg.timm_drop_path is None else {"drop_path_rate": cfg.timm_drop_path}
    source = cfg.timm_model_pretrained
    if isinstance(source, str) and source:
        if not Path(source).is_file():
            raise FileNotFoundError(f"vision_cfg.timm_model_pretrained {source}: no such checkpoint file")
        return timm.create_model(cfg.timm_model_name, pretrained=True, pretrained_cfg_overlay={"file": source},
                                 **kwargs)
    return timm.create_model(cfg.timm_model_name, pretrained=bool(source), **kwargs)


class TimmVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        timm = require_timm()
        if cfg.timm_pool in ("abs_attn", "rot_attn"):
            raise ValueError(f"vision_cfg.timm_pool {cfg.timm_pool!r} (attention pooling) is not supported; "
                             "use 'avg', 'max', 'token' or '' (the network's own pooling)")
        self.trunk = _create_trunk(timm, cfg)
        self.trunk.reset_classifier(0, **({"global_pool": cfg.timm_pool} if cfg.timm_pool else {}))
        width = self.trunk.num_features
        head = OrderedDict()
        if cfg.timm_proj == "mlp":
            from timm.layers import Mlp

            head["mlp"] = Mlp(width, 2 * embed_dim, embed_dim, drop=(cfg.timm_drop, 0),
                              bias=(True, cfg.timm_proj_bias))
        else:
            head["drop"] = nn.Dropout(cfg.timm_drop)
            head["proj"] = nn.Linear(width, embed_dim, bias=cfg.timm_proj_bias)
        self.head = nn.Sequential(head)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (N, 3, H, W) -> features (N, embed_dim)."""
        return self.head(self.trunk(images))  # trunk: pooled (N, width)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)
