"""What the last `Session.generate` did: token counts, time to first token, decode rate, and for
speculative decoding the rounds, proposals and acceptances. Plain data; it measures nothing itself
(`runtimes.session` and `runtimes.speculative` fill it in).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationStats:
    """What the last `generate` did. Times cover the runtime and the sampler only, not the consumer."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # prefill + the first sample: time to first token
    decode_s: float = 0.0  # everything after the first token
    # speculative decoding (zero otherwise)
    draft_tokens: int = 0  # k: tokens the draft proposes per round
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0  # verification calls, prefill excluded
    draft_forwards: int = 0

    @property
    def ttft_s(self) -> float:
        return self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return (self.new_tokens - 1) / self.target_forwards if self.target_forwards else 0.0

    def summary(self) -> str:
        line = (f"{self.new_tokens} tokens, time to first token {self.ttft_s * 1e3:.1f} ms, "
                f"decode {self.decode_tokens_per_s:.1f} tok/s")
        if self.draft_tokens:
            line += (f"; speculative k={self.draft_tokens}: acceptance {self.acceptance_rate:.1%} "
                     f"({self.accepted}/{self.proposed}), {self.tokens_per_target_forward:.2f} tokens per "
                     f"target forward")
        return line
