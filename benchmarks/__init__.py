"""Benchmarks: figures beside ceilings measured in the same run; JSON + markdown under benchmarks/results/."""
