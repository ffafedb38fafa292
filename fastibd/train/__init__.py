"""Training: the Trainer (fastibd.train.trainer) and its command line (`python -m
fastibd.train`, fastibd.train.cli)."""

from fastibd.train.cli import main
from fastibd.train.trainer import Trainer

__all__ = ["Trainer", "main"]
