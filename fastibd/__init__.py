"""fastibd: Information Bottleneck Distillation for adversarially robust classifiers."""

__version__ = "0.1.0"
