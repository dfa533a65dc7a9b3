"""CLIP's Vision Transformer image tower (Radford et al. 2021, sec. 2.4; Dosovitskiy et al. 2020).

Patch convolution without bias, class token, positional embedding, ``ln_pre`` (CLIP's addition),
pre-norm blocks, ``ln_post`` on the class token, linear projection ``proj``.
"""
from __future__ import annotations

import torch
from torch import nn

from clipforge.models.config import VisionConfig
from clipforge.models.layers import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.image_size, self.patch_size, self.output_dim = cfg.image_size, cfg.patch_size, output_dim
        self.token_width = cfg.width
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width ** -0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.ln_pre = LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, act)
        self.ln_post = LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, output_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, D, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (N, grid*grid, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, 1 + grid*grid, D)
        return self.transformer(self.ln_pre(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(self._blocks(x)[:, 0]) @ self.proj  # (N, output_dim)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> every token after the last block through ``ln_post``: (N, 1 + grid*grid, token_width)."""
        return self.ln_post(self._blocks(x))
