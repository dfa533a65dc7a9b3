"""The CLIP model (Radford et al. 2021): image tower + text tower + learned temperature.

Both towers end in a linear projection into one joint space. ``forward`` returns OpenAI's
``(logits_per_image, logits_per_text)``: ``exp(logit_scale) * normalize(I) @ normalize(T).T`` and its
transpose; the product of two L2-normalised feature matrices is the matrix of cosine similarities.
``forward(..., output_dict=True)`` and ``features`` give OpenCLIP's contract instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.config import CLIPConfig
from clipforge.models.heads import CaptionDecoder, ProjectionMLP
from clipforge.models.hf_text import HFTextTower
from clipforge.models.layers import activation
from clipforge.models.resnet import ModifiedResNet
from clipforge.models.text import TextTower
from clipforge.models.timm_vision import TimmVisionTower
from clipforge.models.vit import VisionTransformer

# Parameters that are not the text tower's: the image side, the temperature, the objectives' heads.
_NOT_TEXT = ("visual.", "image_mlp.", "logit_scale", "bow_head.", "class_head.", "decoder.")


class CLIP(TextTower):
    def __init__(self, cfg: CLIPConfig):
        act = activation(cfg.quick_gelu)
        if cfg.objective != "contrastive":  # the baselines of sec. 2.3 have no text encoder
            nn.Module.__init__(self)
            self.text, self.transformer = None, None
            self.context_length, self.vocab_size = cfg.text_cfg.context_length, cfg.text_cfg.vocab_size
        elif cfg.text_cfg.hf_model_name:  # a child module ``text``, OpenCLIP's key layout for such towers
            nn.Module.__init__(self)
            self.text = HFTextTower(cfg.text_cfg, cfg.embed_dim)
            self.context_length, self.transformer = cfg.text_cfg.context_length, None
        else:
            super().__init__(cfg.text_cfg, cfg.embed_dim, act)
            self.text = None
        self.config = cfg
        if cfg.vision_cfg.timm_model_name:
            self.visual = TimmVisionTower(cfg.vision_cfg, cfg.embed_dim)
        elif cfg.vision_cfg.is_resnet:
            self.visual = ModifiedResNet(cfg.vision_cfg, cfg.embed_dim)
        else:
            self.visual = VisionTransformer(cfg.vision_cfg, cfg.embed_dim, act)
        self.visual.input_resolution = cfg.vision_cfg.image_size  # OpenAI's name on either image tower
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)), requires_grad=cfg.learn_logit_scale)
        self._frozen: set[str] = set()
        self._add_heads(cfg, act)

    def _add_heads(self, cfg: CLIPConfig, act: type[nn.Module]) -> None:
        if cfg.projection == "mlp":
            self.image_mlp = ProjectionMLP(cfg.embed_dim)
            if cfg.objective == "contrastive":
                self.text_mlp = ProjectionMLP(cfg.embed_dim)
        if cfg.objective == "bow":
            self.bow_head = nn.Linear(cfg.embed_dim, cfg.text_cfg.vocab_size)
        elif cfg.objective == "caption":
            self.decoder = CaptionDecoder(cfg.text_cfg, self.visual.token_width, act)
        elif cfg.objective == "classify":
            self.class_head = nn.Linear(cfg.embed_dim, len(cfg.classnames))

    @property
    def objective(self) -> str:
        """"contrastive" (CLIP), or a text-encoder-free baseline: "bow", "caption" or "classify"."""
        return self.config.objective

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision_cfg.image_size

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Preprocessed images (N, 3, H, W) -> features (N, embed_dim)."""
        x = self.visual(images.to(self.dtype))
        if self.config.projection == "mlp":
            x = self.image_mlp(x)
        return F.normalize(x, dim=-1) if normalize else x

    def bow_logits(self, images: torch.Tensor) -> torch.Tensor:
        """A "bow" model's vocabulary logits (N, vocab_size) of the words in each image's caption."""
        return self._head("bow", "bow_head")(self.encode_image(images))

    def class_logits(self, images: torch.Tensor) -> torch.Tensor:
        """A "classify" model's logits (N, len(config.classnames)), columns in label order."""
        return self._head("classify", "class_head")(self.encode_image(images))

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's token sequence (N, S, token_width) a caption decoder attends to."""
        return self.visual.forward_tokens(images.to(self.dtype))

    def caption_logits(self, images: torch.Tensor, tokens: torch.Tensor, predicted_only: bool = False) -> torch.Tensor:
        """A "caption" model's teacher-forced logits (N, L, vocab_size): position t predicts token t + 1.

        ``predicted_only=True``: (P, vocab_size) at only the positions the caption loss counts (each row's
        tokens 1..end-of-text, row-major; ``loss.predicted_token_mask``), skipping the output layer elsewhere.
        """
        decoder = self._head("caption", "decoder")
        memory = decoder.memory(self.image_tokens(images))
        return decoder.decode_predicted(memory, tokens) if predicted_only else decoder.decode(memory, tokens)

    def _head(self, objective: str, name: str) -> nn.Module:
        if self.objective != objective:
            raise ValueError(f"{name} needs a {objective!r} model; this one is a {self.objective!r} model")
        return getattr(self, name)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                output_dict: bool = False) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        """OpenAI's ``(logits_per_image, logits_per_text)``; with ``output_dict=True`` OpenCLIP's dict of
        ``image_features``, ``text_features`` (L2-normalised) and ``logit_scale`` (already exponentiated)."""
        image_features, text_features, scale = self.features(images, tokens)
        if output_dict:
            return {"image_features": image_features, "text_features": text_features, "logit_scale": scale}
        logits_per_image = scale * image_features @ text_features.t()  # (N_img, N_txt)
        return logits_per_image, logits_per_image.t()

    def features(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """OpenCLIP's ``image_features, text_features, logit_scale = model(image, text)``: normalised
        features and ``exp(logit_scale)``, ready for ``contrastive_loss``."""
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(tokens, normalize=True)
        return image_features, text_features, self.logit_scale.exp()

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids (N, L) of the model's tokenizer (``clipforge.model_tokenizer``) -> features (N, embed_dim)."""
        if self.objective != "contrastive":
            raise ValueError(f"this is a {self.objective!r} model: it has no text encoder; for zero-shot "
                             "classification use clipforge.zeroshot.ZeroShotClassifier(model, classnames).scores")
        x = super().encode_text(tokens) if self.text is None else self.text(tokens)
        if self.config.projection == "mlp":
            x = self.text_mlp(x)
        return F.normalize(x, dim=-1) if normalize else x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass: less memory for more compute."""
        self.visual.set_grad_checkpointing(enable)
        if self.objective == "caption":
            self.decoder.grad_checkpointing = enable
        if self.text is not None:
            self.text.set_grad_checkpointing(enable)
        elif self.transformer is not None:
            self.transformer.grad_checkpointing = enable

    def text_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith(_NOT_TEXT)]

    def freeze(self, image: bool = False, text: bool = False, text_unlocked_layers: int = 0) -> None:
        """Freeze a tower (LiT: a locked image tower with a trained text tower); BatchNorm stays in eval.

        ``text_unlocked_layers`` leaves the text tower's last N blocks trainable (OpenCLIP's
        ``lock_text_unlocked_layers``). A Hugging Face text tower keeps its projection trainable, as
        OpenCLIP's does: it is new, the pretrained model under it is what is locked.
        """
        self._frozen = {name for name, on in (("image", image), ("text", text)) if on}
        for p in self.visual.parameters():
            p.requires_grad_(not image)
        if self.config.projection == "mlp":
            self.image_mlp.requires_grad_(not image)
        for p in self.text_parameters():
            p.requires_grad_(not text)
        if text and self.text is not None:
            self.text.lock(text_unlocked_layers)
            for p in self.text.proj.parameters():
                p.requires_grad_(True)
        elif text and text_unlocked_layers:
            for module in (*self.transformer.resblocks[-text_unlocked_layers:], self.ln_final):
                module.requires_grad_(True)
            self.text_projection.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "CLIP":
        super().train(mode)
        if "image" in self._frozen:
            self.visual.eval()
        return self
