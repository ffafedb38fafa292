"""Benchmarks: data loading (`python -m fastibd.bench_data`) and training steps
(`python -m fastibd.bench_step`)."""
