"""The method: training attacks, the IBD objective and its baselines, one training step."""
