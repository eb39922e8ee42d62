"""Judging a model as the field does: multiple-choice and last-word benchmarks (HellaSwag, ARC-Easy, PIQA, LAMBADA)
scored by log-likelihood exactly as lm-evaluation-harness scores them, after training (evaluate.py) and during it."""
