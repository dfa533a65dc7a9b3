"""CLIP models: configs, shared layers, the two towers and the CLIP model."""
from clipforge.models.clip import CLIP
from clipforge.models.config import CLIPConfig, TextConfig, VisionConfig
from clipforge.models.registry import get_model_config, list_models

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "get_model_config", "list_models"]
