"""The trained tiny checkpoints of the runtime tests ("float", its RTN 4-bit child "q4"), reused for
the drop-in tests: greedy comparisons need a trained model's peaked logits."""

from tests.runtimes.conftest import checkpoints  # noqa: F401  (fixture)
