"""The precision search: a greedy knapsack frontier on measured per-unit sensitivities, then candidates.

Each unit takes 4 bits, 5 (where the sensitivities measured it: a GGUF's Q5_0), 8 bits or stays float. The
model's KLD is estimated as the sum of the units' own KLDs (what `sensitivity` measured one unit at a time; a unit
kept float adds nothing) and its size as the sum of the units' deployed bytes. Starting from every unit at 4 bits,
each step makes the one upgrade (a unit to any wider width it was measured at, or to float) that removes the most
estimated KLD per byte added; the list of
assignments after each step is the frontier, smallest first. `pick` chooses the candidates to build and
measure: uniform 4-bit (the baseline every run measures), the largest assignment within the size limit,
and evenly spaced ones between them. Ties break on the unit order, so a seed and the same sensitivities
give the same candidates. With structured pruning allowed (`max_drop` blocks, measured as state "drop": 0 bytes),
the path also goes down from uniform 4-bit: each step drops the block that adds the least estimated KLD per
byte saved; those points come first (smallest). This module measures nothing and builds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolchain.tune.sensitivity import DROP, FLOAT, unit_rule

ORDER = ("4", "5", "8", FLOAT)  # narrowest first


@dataclass(frozen=True)
class Assignment:
    bits: tuple[tuple[str, str], ...]  # (unit, "4" | "5" | "8" | "float" | "drop") in unit order
    est_kld: float
    est_bytes: int

    @property
    def by_unit(self) -> dict[str, str]:
        return dict(self.bits)

    def label(self) -> str:
        """Short: how many units at each precision, e.g. "4-bit x5, 8-bit x1" ("dropped x1": blocks removed)."""
        counts = {p: sum(1 for _, b in self.bits if b == p) for p in (*ORDER, DROP)}
        names = {FLOAT: FLOAT, DROP: "dropped"}
        return ", ".join(f"{names.get(p, p + '-bit')} x{n}" for p, n in counts.items() if n)

    def dropped(self) -> tuple[int, ...]:
        """The blocks this assignment removes (prune:method=layers,drop=...), in order."""
        return tuple(int(u.split(".")[1]) for u, b in self.bits if b == DROP)

    def rules(self) -> list[list]:
        """Ordered quantize rules (regex, 4 | 5 | 8 | "skip") that build this assignment, one per kept unit, under
        the block indices left after the dropped blocks are removed."""
        gone = self.dropped()
        out = []
        for u, b in self.bits:
            if b == DROP:
                continue
            if u.startswith("layers."):
                i = int(u.split(".")[1])
                u = f"layers.{i - sum(1 for d in gone if d < i)}"
            out.append([unit_rule(u), "skip" if b == FLOAT else int(b)])
        return out


def estimate(bits: dict[str, str], sens: dict) -> Assignment:
    kld = sum(0.0 if b == FLOAT else sens["units"][u][b] for u, b in bits.items())
    size = sum(sens["bytes"][u][b] for u, b in bits.items())
    return Assignment(tuple(bits.items()), kld, size)


def uniform(path: list[Assignment]) -> Assignment:
    """The all-4-bit point of a frontier (the baseline every tune builds first)."""
    return next(a for a in path if all(b == "4" for _, b in a.bits))


def dropping(sens: dict, max_drop: int) -> list[Assignment]:
    """From all-4-bit, drop up to `max_drop` blocks (never all), cheapest estimated KLD per byte first; the points
    after each drop, largest first."""
    bits = {u: "4" for u in sens["units"]}
    blocks = [u for u in bits if DROP in sens["units"][u]]
    out = []
    for _ in range(min(max_drop, len(blocks) - 1)):
        cost = {u: (sens["units"][u][DROP] - sens["units"][u]["4"]) / max(sens["bytes"][u]["4"], 1)
                for u in blocks if bits[u] == "4"}
        u = min(cost, key=cost.get)
        bits[u] = DROP
        out.append(estimate(bits, sens))
    return out


def frontier(sens: dict, max_drop: int = 0) -> list[Assignment]:
    """Every assignment on the greedy path from all-4-bit to all-float, smallest first; with `max_drop`, the
    points with blocks dropped before it."""
    bits = {u: "4" for u in sens["units"]}
    path = [*reversed(dropping(sens, max_drop)), estimate(bits, sens)]
    while True:
        best, best_gain = None, None
        for u, b in bits.items():
            if b not in ORDER:
                continue
            for up in [w for w in ORDER[ORDER.index(b) + 1:] if w == FLOAT or w in sens["units"][u]]:
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
    base = uniform(path) if any(all(b == "4" for _, b in a.bits) for a in path) else path[0]
    within = [a for a in path if max_bytes is None or a.est_bytes <= max_bytes] or path[:1]
    chosen = [base]
    if n > 1 and within[-1].bits != base.bits:
        chosen.append(within[-1])
        middle = [a for a in within[:-1] if a.bits != base.bits]
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
