"""Kernel tests reuse the trained tiny checkpoints ("float" and its RTN 4-bit child "q4") of the
session fixture `checkpoints` (tests/runtimes/fixtures.py, imported by tests/conftest.py): greedy
comparisons need a trained model's peaked logits."""
