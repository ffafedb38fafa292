"""Triton kernels for the feature-distillation hot path (see DESIGN.md §3)."""
