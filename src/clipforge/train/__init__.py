"""Contrastive pre-training and fine-tuning of CLIP (Radford et al. 2021): ``train(TrainConfig(...))``,
the engine behind ``clipforge train``; single process, torchrun or SLURM."""
from clipforge.train.config import TrainConfig
from clipforge.train.loop import train

__all__ = ["TrainConfig", "train"]
