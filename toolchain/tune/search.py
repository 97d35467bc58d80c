"""The precision search: a greedy knapsack frontier on measured per-unit sensitivities, then candidates.

Each unit takes 4 bits, 8 bits or stays float. The model's KLD is estimated as the sum of the units'
own KLDs (what `sensitivity` measured one unit at a time; a unit kept float adds nothing) and its size
as the sum of the units' deployed bytes. Starting from every unit at 4 bits, each step upgrades the one
unit whose upgrade (4 -> 8, or 8 -> float) removes the most estimated KLD per byte added; the list of
assignments after each step is the frontier, smallest first. `pick` chooses the candidates to build and
measure: uniform 4-bit (the baseline every run measures), the largest assignment within the size limit,
and evenly spaced ones between them. Ties break on the unit order, so a seed and the same sensitivities
give the same candidates. This module measures nothing and builds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolchain.tune.sensitivity import FLOAT, unit_rule

NEXT = {"4": "8", "8": FLOAT}


@dataclass(frozen=True)
class Assignment:
    bits: tuple[tuple[str, str], ...]  # (unit, "4" | "8" | "float") in unit order
    est_kld: float
    est_bytes: int

    @property
    def by_unit(self) -> dict[str, str]:
        return dict(self.bits)

    def label(self) -> str:
        """Short: how many units at each precision, e.g. "4-bit x5, 8-bit x1"."""
        counts = {p: sum(1 for _, b in self.bits if b == p) for p in ("4", "8", FLOAT)}
        return ", ".join(f"{p if p == FLOAT else p + '-bit'} x{n}" for p, n in counts.items() if n)

    def rules(self) -> list[list]:
        """Ordered quantize rules (regex, 4 | 8 | "skip") that build this assignment, one per unit."""
        return [[unit_rule(u), "skip" if b == FLOAT else int(b)] for u, b in self.bits]


def estimate(bits: dict[str, str], sens: dict) -> Assignment:
    kld = sum(0.0 if b == FLOAT else sens["units"][u][b] for u, b in bits.items())
    size = sum(sens["bytes"][u][b] for u, b in bits.items())
    return Assignment(tuple(bits.items()), kld, size)


def frontier(sens: dict) -> list[Assignment]:
    """Every assignment on the greedy path from all-4-bit to all-float, smallest first."""
    bits = {u: "4" for u in sens["units"]}
    path = [estimate(bits, sens)]
    while True:
        best, best_gain = None, None
        for u, b in bits.items():
            if b not in NEXT:
                continue
            up = NEXT[b]
            removed = (sens["units"][u][b]) - (0.0 if up == FLOAT else sens["units"][u][up])
            added = sens["bytes"][u][up] - sens["bytes"][u][b]
            gain = removed / max(added, 1)
            if best_gain is None or gain > best_gain:
                best, best_gain = (u, up), gain
        if best is None:
            return path
        bits[best[0]] = best[1]
        path.append(estimate(bits, sens))


def pick(path: list[Assignment], n: int, max_bytes: float | None = None,
         max_kld: float | None = None) -> list[Assignment]:
    """Up to `n` assignments to build: uniform 4-bit first, then the best estimated within the limits, then evenly
    spaced between them (by size). `max_kld` drops the estimated-worse ones only when some meet it."""
    within = [a for a in path if max_bytes is None or a.est_bytes <= max_bytes] or path[:1]
    chosen = [path[0]]
    if len(within) > 1 and n > 1:
        chosen.append(within[-1])
        middle = within[1:-1]
        k = min(n - 2, len(middle))
        for i in range(k):
            chosen.insert(-1, middle[round((i + 1) * (len(middle) + 1) / (k + 1)) - 1])
    seen, out = set(), []
    for a in chosen:
        if a.bits not in seen:
            seen.add(a.bits)
            out.append(a)
    if max_kld is not None and any(a.est_kld <= max_kld for a in out):
        out = [out[0]] + [a for a in out[1:] if a.est_kld <= max_kld]
    return out
