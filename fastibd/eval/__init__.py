"""Evaluation: robustness reports (`python -m fastibd.evaluate`) and figures of a run
(`python -m fastibd.report`)."""
