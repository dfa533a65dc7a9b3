"""Blocks shared by the towers: fp32 LayerNorm, QuickGELU, SDPA attention, pre-norm Transformer.

Parameter names follow OpenAI's CLIP (``attn.in_proj_weight``, ``mlp.c_fc``, ``ln_1`` ...), so
OpenAI and OpenCLIP state dicts load without remapping.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so it stays exact under fp16/bf16 autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or torch.jit.is_tracing():
            return x * torch.sigmoid(1.702 * x)
        return (1.702 * x).sigmoid_().mul_(x)  # inference: the same values with one buffer instead of three


def activation(quick_gelu: bool) -> type[nn.Module]:
    return QuickGELU if quick_gelu else nn.GELU


QUICK_GELU_SCALE = 1.702


class MLP(nn.Sequential):
    """``c_fc`` -> activation -> ``c_proj`` (OpenAI's parameter names).

    With QuickGELU, x * sigmoid(1.702 x) is computed as SiLU(1.702 x) / 1.702 with both scalings inside
    the matrix multiplies (BLAS's alpha and beta): one fused activation pass over the widest tensor of
    the block instead of three elementwise ones, forward and backward, for the same function.
    """

    def __init__(self, width: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)), ("gelu", act()), ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.gelu, QuickGELU) or torch.jit.is_tracing() or torch.jit.is_scripting():
            return super().forward(x)
        fc, proj = self.c_fc, self.c_proj
        flat = x.reshape(-1, x.shape[-1])
        h = torch.addmm(fc.bias, flat, fc.weight.t(), beta=QUICK_GELU_SCALE, alpha=QUICK_GELU_SCALE)
        h = F.silu(h, inplace=not (torch.is_grad_enabled() and h.requires_grad))  # 1.702 * QuickGELU
        out = torch.addmm(proj.bias, h, proj.weight.t(), alpha=1 / QUICK_GELU_SCALE)
        return out.view(*x.shape[:-1], out.shape[-1])


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout, run through SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (N, L, 3D)
        # chunk, not view + unbind: its backward is one concatenation, with no copy of the packed gradient
        q, k, v = (t.view(n, length, self.heads, width // self.heads).transpose(1, 2)
                   for t in qkv.chunk(3, dim=-1))  # each (N, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = out.transpose(1, 2).reshape(n, length, width)  # (N, L, D)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: type[nn.Module] = nn.GELU):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, hidden, act)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks on (N, L, D) inputs, optionally causal."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
                 act: type[nn.Module] = nn.GELU, causal: bool = False):
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, causal=self.causal)
        return x

    def init_weights(self) -> None:
        """OpenAI's initialisation: std scaled by width and depth."""
        proj_std = (self.width ** -0.5) * ((2 * self.layers) ** -0.5)
        attn_std = self.width ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
