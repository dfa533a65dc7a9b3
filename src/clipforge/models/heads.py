"""Heads of the paper's objective baselines (Radford et al. 2021, sec. 2.3-2.4): SimCLR's MLP projection and
the caption decoder, a causal Transformer whose blocks also attend to the image tower's tokens (as VirTex's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.loss import predicted_token_mask
from clipforge.models.config import TextConfig
from clipforge.models.layers import MLP, Attention, LayerNorm


class ProjectionMLP(nn.Module):
    """ReLU then ``fc`` Linear(embed_dim, embed_dim): after a tower's linear projection, a two-layer head."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(x))


class CrossAttention(Attention):
    """Multi-head attention of queries ``x`` (N, L, D) over a memory (N, S, D); ``Attention``'s packed
    ``in_proj`` layout, whose first D rows project the queries and the other 2D the keys and values."""

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        w_q, w_kv = self.in_proj_weight.split([width, 2 * width])
        b_q, b_kv = self.in_proj_bias.split([width, 2 * width])
        q = F.linear(x, w_q, b_q).view(n, length, self.heads, -1).transpose(1, 2)  # (N, heads, L, head_dim)
        k, v = (t.view(n, memory.shape[1], self.heads, -1).transpose(1, 2)
                for t in F.linear(memory, w_kv, b_kv).chunk(2, dim=-1))  # each (N, heads, S, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))  # (N, L, D)


class DecoderBlock(nn.Module):
    """Pre-norm: x + causal self-attention, x + cross-attention to the image, x + MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(width), Attention(width, heads)
        self.ln_cross, self.cross_attn = LayerNorm(width), CrossAttention(width, heads)
        self.ln_2, self.mlp = LayerNorm(width), MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=True)
        x = x + self.cross_attn(self.ln_cross(x), memory)
        return x + self.mlp(self.ln_2(x))


class CaptionDecoder(nn.Module):
    """Teacher-forced caption model sized by ``text_cfg``: ``forward(image_tokens, tokens) -> (N, L, V)``
    where position t predicts token t + 1. The output layer is the token embedding (tied, as GPT-2's)."""

    def __init__(self, cfg: TextConfig, image_width: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.ln_image, self.image_proj = LayerNorm(image_width), nn.Linear(image_width, cfg.width)
        self.blocks = nn.ModuleList(DecoderBlock(cfg.width, cfg.heads, cfg.mlp_ratio, act) for _ in range(cfg.layers))
        self.ln_final = LayerNorm(cfg.width)
        self.grad_checkpointing = False
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def memory(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image tower tokens (N, S, image_width) -> the memory the blocks attend to (N, S, width)."""
        return self.image_proj(self.ln_image(image_tokens))

    def hidden(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Memory (N, S, width) and token ids (N, L) -> final states (N, L, width), before the output layer."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"caption tokens must be (batch, length <= {self.context_length}), got {tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # (N, L, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, memory, use_reentrant=False)
            else:
                x = block(x, memory)
        return self.ln_final(x)

    def decode(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Memory (N, S, width) and token ids (N, L) -> next-token logits (N, L, vocab_size)."""
        return self.hidden(memory, tokens) @ self.token_embedding.weight.t()  # (N, L, V)

    def decode_predicted(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits (P, vocab_size) at only the P positions the caption loss counts (each row's
        tokens 1..end-of-text, row-major; ``loss.predicted_token_mask``): the output layer nowhere else."""
        states = self.hidden(memory, tokens)[:, :-1]  # (N, L - 1, D): position t predicts token t + 1
        return states[predicted_token_mask(tokens)] @ self.token_embedding.weight.t()  # (P, V)

    def prompt_log_likelihoods(self, memory: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """(B, P) log-likelihood of each prompt (P, L) given each memory (B, S, width): for every pair, the
        same as ``loss.caption_log_likelihood(self.decode(...))``, with the output layer's normaliser computed
        once per distinct prefix at the predicted positions only (prompts share their template's words)."""
        (b, p), length = (len(memory), len(prompts)), prompts.shape[1] - 1
        first, index, predicted = _distinct_prefixes(prompts)
        states = self.hidden(memory.repeat_interleave(p, dim=0), prompts.repeat(b, 1))[:, :-1].float()
        states = states.reshape(b, p * length, -1)  # (B, P * (L - 1), D): position t predicts token t + 1
        weight = self.token_embedding.weight.float()
        normaliser = torch.logsumexp(states[:, first.to(states.device)] @ weight.t(), dim=-1)  # (B, U)
        target = (states * weight[prompts[:, 1:].reshape(-1)]).sum(-1)  # (B, P * (L - 1))
        per_token = (target - normaliser[:, index.to(states.device)]) * predicted.to(states.device)
        return per_token.view(b, p, length).sum(-1)

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(self.memory(image_tokens), tokens)


def _distinct_prefixes(prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the predicted positions (1..end-of-text) of prompts (P, L), flattened over (P, L - 1): the first
    position of each distinct prefix (U,), each position's prefix number (P * (L - 1),) and the mask."""
    rows, length = prompts.tolist(), prompts.shape[1] - 1
    numbers: dict[tuple[int, int], int] = {}
    first, index, predicted = [], [0] * (len(rows) * length), [False] * (len(rows) * length)
    for i, row in enumerate(rows):
        prefix = -1  # a prefix is numbered by (its own prefix's number, its last token): a trie
        for t in range(min(length, row.index(max(row)))):
            prefix = numbers.setdefault((prefix, row[t]), len(numbers))
            if prefix == len(first):
                first.append(i * length + t)
            index[i * length + t], predicted[i * length + t] = prefix, True
    return torch.tensor(first), torch.tensor(index), torch.tensor(predicted)
