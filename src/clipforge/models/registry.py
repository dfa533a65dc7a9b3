"""The architecture registry: one JSON file per named architecture in ``clipforge/model_configs``."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from clipforge.models.config import CLIPConfig

# OpenAI's names -> their configs. File names follow OpenCLIP: 'ViT-B-32' is the GELU model and
# 'ViT-B-32-quickgelu' the QuickGELU one that OpenAI trained; OpenAI's own names keep OpenAI's
# QuickGELU meaning, the ResNets' ('RN50', ...) included.
OPENAI_NAMES = {
    "RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16", "RN50x64": "RN50x64",
    "ViT-B/32": "ViT-B-32-quickgelu", "ViT-B/16": "ViT-B-16-quickgelu", "ViT-L/14": "ViT-L-14-quickgelu",
    "ViT-L/14@336px": "ViT-L-14-336-quickgelu",
}


@lru_cache(maxsize=None)
def _config_files() -> dict[str, Path]:
    folder = resources.files("clipforge") / "model_configs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json")}


def list_models() -> list[str]:
    """Names of all registered architectures (file names in ``model_configs``)."""
    return sorted(_config_files())


def canonical_name(name: str) -> str | None:
    """The registry name for ``name`` (OpenAI's 'ViT-B/32' -> 'ViT-B-32-quickgelu'), or None if unknown."""
    name = OPENAI_NAMES.get(name, name)
    files = _config_files()
    if name in files:
        return name
    lowered = {k.lower(): k for k in files}
    return lowered.get(name.lower())


def get_model_config(name_or_path: str | Path) -> CLIPConfig:
    """Config of a registered architecture, or of a JSON file (our schema or OpenCLIP's)."""
    name = canonical_name(str(name_or_path))
    if name is not None:
        return CLIPConfig.from_json(_config_files()[name])
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"model config file {path} does not exist")
        return CLIPConfig.from_json(path)
    raise ValueError(f"unknown model {str(name_or_path)!r}: not a registered architecture and not a JSON file. "
                     f"Registered: {', '.join(list_models())}")
