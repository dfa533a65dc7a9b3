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
PACK_ROWS = 16  # the product height oneDNN's packed layout is chosen for: a short text query's tokens


class _PackedLinear:
    """x @ (weight_scale * weight).T + bias_scale * bias, then a fused activation, with the weight held in
    oneDNN's blocked layout; usable only while its weight and bias are the tensors, unmodified, it was made
    from, and only where the plain product would run on the CPU in float32 without gradients or tracing."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, weight_scale: float = 1.0, bias_scale: float = 1.0,
                 activation: str | tuple[str, str] = "none"):
        self._sources = [(t, t.data_ptr(), t._version) for t in (weight, bias)]
        with torch.no_grad():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach() * weight_scale, PACK_ROWS)
            self.bias = bias.detach() * bias_scale
        self.activation = (activation, "") if isinstance(activation, str) else activation
        self.out_features = weight.shape[0]

    def usable(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                and not torch.compiler.is_compiling()
                and all(t.data_ptr() == ptr and t._version == version for t, ptr, version in self._sources))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        attr, algorithm = self.activation
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, self.bias, attr, [],
                                                 algorithm)
        return out.view(*x.shape[:-1], self.out_features)

    def __reduce__(self):
        return _dropped_copy, ()  # a copy (deepcopy, pickle) of a module does not carry its packed weights


def _dropped_copy() -> None:
    return None


def pack_linear_weights(module: nn.Module) -> bool:
    """Give every attention and MLP block under ``module`` oneDNN-packed copies of its weights, for
    inference on the CPU: float32 products of a few rows, as a text query's, run faster on a weight laid
    out once than on one the BLAS repacks at every call. The results equal the plain ones up to float32
    rounding. Passes with gradients, tracing or another device or dtype, and any pass after a weight was
    modified or replaced, use the weights themselves. The copies take as much memory as the weights.
    Returns False, packing nothing, where this torch has no oneDNN."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    for block in module.modules():
        if isinstance(block, (Attention, MLP)):
            block.pack()
    return True


class MLP(nn.Sequential):
    """``c_fc`` -> activation -> ``c_proj`` (OpenAI's parameter names).

    With QuickGELU, x * sigmoid(1.702 x) is computed as SiLU(1.702 x) / 1.702 with both scalings inside
    the matrix multiplies (BLAS's alpha and beta): one fused activation pass over the widest tensor of
    the block instead of three elementwise ones, forward and backward, for the same function.
    """

    def __init__(self, width: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)), ("gelu", act()), ("c_proj", nn.Linear(hidden, width))]))
        self._packed: dict[str, _PackedLinear] = {}

    def pack(self) -> None:
        """oneDNN-packed copies of both weights, with the activation fused into the first product
        (QuickGELU as SiLU(1.702 h) / 1.702, the scalings folded into the weights); see
        ``pack_linear_weights``."""
        fc, proj = self.c_fc, self.c_proj
        if isinstance(self.gelu, QuickGELU):
            self._packed = {"c_fc": _PackedLinear(fc.weight, fc.bias, QUICK_GELU_SCALE, QUICK_GELU_SCALE, "swish"),
                            "c_proj": _PackedLinear(proj.weight, proj.bias, 1 / QUICK_GELU_SCALE)}
        elif isinstance(self.gelu, nn.GELU):
            algorithm = "none" if self.gelu.approximate == "none" else "tanh"
            self._packed = {"c_fc": _PackedLinear(fc.weight, fc.bias, activation=("gelu", algorithm)),
                            "c_proj": _PackedLinear(proj.weight, proj.bias)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed_fc, packed_proj = self._packed.get("c_fc"), self._packed.get("c_proj")
        if packed_fc is not None and packed_proj is not None and packed_fc.usable(x) and packed_proj.usable(x):
            return packed_proj(packed_fc(x))
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
        self._packed: dict[str, _PackedLinear] = {}

    def pack(self) -> None:
        """oneDNN-packed copies of the input and output projections; see ``pack_linear_weights``."""
        self._packed = {"in_proj": _PackedLinear(self.in_proj_weight, self.in_proj_bias),
                        "out_proj": _PackedLinear(self.out_proj.weight, self.out_proj.bias)}

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        packed_in, packed_out = self._packed.get("in_proj"), self._packed.get("out_proj")
        if packed_in is not None and packed_in.usable(x):
            qkv = packed_in(x)
        else:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (N, L, 3D)
        out = attend(qkv, self.heads, causal)
        return packed_out(out) if packed_out is not None and packed_out.usable(out) else self.out_proj(out)


def attend(qkv: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention of packed projections (N, L, 3D) -> (N, L, D), before the
    output projection."""
    n, length, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    # chunk, not view + unbind: its backward is one concatenation, with no copy of the packed gradient
    q, k, v = (t.view(n, length, heads, width // heads).transpose(1, 2)
               for t in qkv.chunk(3, dim=-1))  # each (N, heads, L, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(n, length, width)  # (N, L, D)


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
