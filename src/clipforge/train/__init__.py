"""Contrastive pre-training and fine-tuning of CLIP (Radford et al. 2021): ``train(TrainConfig(...))``,
the engine behind ``clipforge train``; single process, torchrun or SLURM."""
from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
