"""A Hugging Face ``transformers`` text tower, as OpenCLIP's ``HFTextEncoder``: ``AutoModel`` + a pooler over
the non-padding tokens + a projection into the joint space (keys ``text.transformer.*``, ``text.proj.*``).
"""
from __future__ import annotations

import torch
from torch import nn

from clipforge.models.config import HF_POOLERS, TextConfig


def require_transformers():
    """The ``transformers`` module, or an ImportError naming the extra that installs it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("a Hugging Face text tower (text_cfg.hf_model_name) needs transformers: "
                          "pip install 'clipforge[hf]'") from e
    return transformers


def pool(hidden: torch.Tensor, mask: torch.Tensor, kind: str, pooler_output: torch.Tensor | None = None):
    """Token states (N, L, D) and the attention mask (N, L) -> one vector per text (N, D)."""
    if kind == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
        return (hidden * weights).sum(1) / weights.sum(1)
    if kind == "cls_pooler" and pooler_output is not None:  # BERT's trained pooler, as OpenCLIP's cls_pooler
        return pooler_output
    if kind in ("cls", "cls_pooler"):
        return hidden[:, 0]
    last = mask.sum(1).long() - 1  # right padding: the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def projection(kind: str | None, width: int, embed_dim: int) -> nn.Module:
    """OpenCLIP's projections: none (widths equal), linear, or a two-layer GELU MLP, all without bias."""
    if kind is None and width == embed_dim:
        return nn.Identity()
    if kind == "mlp":
        hidden = (width + embed_dim) // 2
        return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))
    return nn.Linear(width, embed_dim, bias=False)


class HFTextTower(nn.Module):
    """``text_cfg.hf_model_name`` (a hub name or a local folder): weights from it when ``hf_model_pretrained``,
    otherwise its architecture with random weights (a clipforge checkpoint then fills them)."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        transformers = require_transformers()
        self.hf_config = transformers.AutoConfig.from_pretrained(cfg.hf_model_name)
        self.pooler_type = HF_POOLERS[cfg.hf_pooler_type or "mean_pooler"]
        pooled = {"add_pooling_layer": self.pooler_type == "cls_pooler"} if _takes_pooling_flag(self.hf_config) else {}
        if cfg.hf_model_pretrained:
            self.transformer = transformers.AutoModel.from_pretrained(cfg.hf_model_name, **pooled)
        else:
            self.transformer = transformers.AutoModel.from_config(self.hf_config, **pooled)
        self.pad_id = self.hf_config.pad_token_id if self.hf_config.pad_token_id is not None else 0
        self.proj = projection(cfg.hf_proj_type, self.hf_config.hidden_size, embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (N, L), padded with the model's pad id -> features (N, embed_dim)."""
        mask = (tokens != self.pad_id).long()  # (N, L)
        out = self.transformer(input_ids=tokens, attention_mask=mask)
        pooled = pool(out.last_hidden_state, mask, self.pooler_type, getattr(out, "pooler_output", None))
        return self.proj(pooled)

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the pretrained model but its last ``unlocked_layers`` blocks (OpenCLIP's
        ``lock_text_unlocked_layers``); LayerNorms are frozen too and the projection stays trainable."""
        for p in self.transformer.parameters():
            p.requires_grad_(False)
        if unlocked_layers:
            for p in _blocks(self.transformer)[-unlocked_layers:].parameters():
                p.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.transformer.gradient_checkpointing_enable()
        else:
            self.transformer.gradient_checkpointing_disable()


def _takes_pooling_flag(hf_config) -> bool:
    return hf_config.model_type in ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "mpnet", "electra")


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a Hugging Face encoder (BERT-like ``encoder.layer`` and others)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to leave some unlocked")
