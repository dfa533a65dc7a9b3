"""The CLIP model (Radford et al. 2021): image tower + text tower + learned temperature.

Both towers end in a linear projection into one joint space. ``forward`` returns OpenAI's
``(logits_per_image, logits_per_text)``: ``exp(logit_scale) * normalize(I) @ normalize(T).T`` and its
transpose; the product of two L2-normalised feature matrices is the matrix of cosine similarities.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig
from .layers import activation
from .resnet import ModifiedResNet
from .text import TextTower
from .vit import VisionTransformer


class CLIP(TextTower):
    def __init__(self, cfg: CLIPConfig):
        act = activation(cfg.quick_gelu)
        super().__init__(cfg.text_cfg, cfg.embed_dim, act)
        self.config = cfg
        if cfg.vision_cfg.is_resnet:
            self.visual = ModifiedResNet(cfg.vision_cfg, cfg.embed_dim)
        else:
            self.visual = VisionTransformer(cfg.vision_cfg, cfg.embed_dim, act)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self._frozen: set[str] = set()

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision_cfg.image_size

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Preprocessed images (N, 3, H, W) -> features (N, embed_dim)."""
        x = self.visual(images.to(self.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(tokens, normalize=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()  # (N_img, N_txt)
        return logits_per_image, logits_per_image.t()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass: less memory for more compute."""
        self.visual.set_grad_checkpointing(enable)
        if self.transformer is not None:
            self.transformer.grad_checkpointing = enable

    def text_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith(("visual.", "logit_scale"))]

    def freeze(self, image: bool = False, text: bool = False) -> None:
        """Freeze a tower (LiT: a locked image tower with a trained text tower); BatchNorm stays in eval."""
        self._frozen = {name for name, on in (("image", image), ("text", text)) if on}
        for p in self.visual.parameters():
            p.requires_grad_(not image)
        for p in self.text_parameters():
            p.requires_grad_(not text)
        self.train(self.training)

    def train(self, mode: bool = True) -> "CLIP":
        super().train(mode)
        if "image" in self._frozen:
            self.visual.eval()
        return self
