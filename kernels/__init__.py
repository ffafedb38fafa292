"""Triton kernels for the feature-distillation hot path (see docs/method.md)."""
