"""CLIP's text tower: a causal Transformer pooled at the end-of-text token, or a CBOW baseline.

The parameters sit at the top level of the CLIP model (``token_embedding``, ``positional_embedding``,
``transformer``, ``ln_final``, ``text_projection``) as in OpenAI's state dicts, which is why CLIP
derives from this class rather than holding it as a child module.
"""
from __future__ import annotations

import torch
from torch import nn

from clipforge.models.config import TextConfig
from clipforge.models.layers import LayerNorm, Transformer


def _may_trim() -> bool:
    """Whether the padding after end-of-text may be cut off: not while tracing or compiling a graph, where
    the cut would be frozen at the example's length (an exported text encoder computes every position)."""
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export())


def cut_after_end_of_text(tokens, eot=None):
    """Token rows ``(N, L)`` (a tensor or a numpy array) cut after the batch's last end-of-text token.

    End-of-text is the largest id of each row; ``eot`` may pass those positions if already computed. The
    positions cut reach no pooled text feature (causal attention; CBOW stops at end-of-text), so the
    features of the cut rows equal those of the full ones. An empty batch is returned as it is.
    """
    if len(tokens) == 0:
        return tokens
    last = tokens.argmax(-1).max() if eot is None else eot.max()
    return tokens[:, : int(last) + 1]


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.context_length, self.vocab_size = cfg.context_length, cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        if cfg.encoder == "transformer":
            self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
            nn.init.normal_(self.positional_embedding, std=0.01)
            self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, act, causal=True)
            self.transformer.init_weights()
        else:  # "cbow": the paper's continuous-bag-of-words baseline, no order, no attention
            self.positional_embedding, self.transformer = None, None
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids (N, L) with end-of-text as the largest id of each row -> features (N, embed_dim)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"text tokens must be (batch, length <= {self.context_length}), got {tuple(tokens.shape)}")
        eot = tokens.argmax(dim=-1)  # end-of-text has the largest id (49407 in OpenAI's vocabulary)
        if _may_trim():  # a caption of 10 tokens costs 10 positions instead of context_length
            tokens = cut_after_end_of_text(tokens, eot)
        x = self.token_embedding(tokens)  # (N, L, D)
        if self.transformer is None:
            upto_eot = torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= eot[:, None]  # (N, L)
            mask = upto_eot.unsqueeze(-1).to(x.dtype)
            x = self.ln_final((x * mask).sum(1) / mask.sum(1))  # (N, D)
        else:
            x = x + self.positional_embedding[: tokens.shape[1]].to(x.dtype)
            x = self.ln_final(self.transformer(x))  # (N, L, D)
            x = x[torch.arange(x.shape[0], device=x.device), eot]  # (N, D)
        x = x @ self.text_projection.to(x.dtype)
        return nn.functional.normalize(x, dim=-1) if normalize else x
