"""CLIP models: configs, shared layers, the two towers and the CLIP model."""
from .clip import CLIP
from .config import CLIPConfig, TextConfig, VisionConfig
from .registry import get_model_config, list_models

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "get_model_config", "list_models"]
