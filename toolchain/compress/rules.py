"""Per-layer quantization rules: ordered (regex, value) pairs, the first full match wins.

Names are our module names: every Linear (`layers.0.self_attn.q_proj`, `lm_head`) and the token
embedding (`embed_tokens`). A value is a bit width (4, 5 or 8; 5 is GGUF's Q5_0, held as 8 bits by the other
formats) or `"skip"` (the layer stays float). A layer no rule matches gets the pass's default bits. A rule that
matches no layer at all is almost always a typo, so it warns (and the warning goes into the pass report). This
module only resolves names; it quantizes nothing.
"""

from __future__ import annotations

import re
import warnings

from models.errors import EdgesmithError
from models.quant import BITS

SKIP = "skip"


def parse_rules(rules) -> tuple[tuple[str, int | str], ...]:
    """Validate rules given as a dict (ordered) or a sequence of pairs; return a tuple of pairs."""
    items = list(rules.items()) if isinstance(rules, dict) else list(rules or ())
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise EdgesmithError(f"rule {item!r}: expected a (regex, value) pair")
        pattern, value = item
        if not isinstance(pattern, str):
            raise EdgesmithError(f"rule {item!r}: the pattern must be a string")
        try:
            re.compile(pattern)
        except re.error as e:
            raise EdgesmithError(f"rule {pattern!r}: not a valid regular expression ({e})") from None
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if value != SKIP and (isinstance(value, bool) or value not in BITS):
            raise EdgesmithError(f"rule {pattern!r}: value {value!r} is not allowed; allowed: "
                                 f"{', '.join(map(str, BITS))}, {SKIP!r}")
        out.append((pattern, value))
    return tuple(out)


def bits_for(name: str, rules, default: int | str) -> int | None:
    """Bits of one layer (None = skip): the first rule that fully matches its name, else the default."""
    value = next((v for p, v in parse_rules(rules) if re.fullmatch(p, name)), default)
    return None if value == SKIP else value


def resolve(names: list[str], rules, default: int | str) -> tuple[dict[str, int | None], list[str]]:
    """Bits per layer name (None = skip) and the warnings for rules that matched no layer."""
    rules = parse_rules(rules)
    plan = {name: bits_for(name, rules, default) for name in names}
    problems = [f"rule '{p}' matches no layer" for p, _ in rules if not any(re.fullmatch(p, n) for n in names)]
    for msg in problems:
        warnings.warn(msg, stacklevel=2)
    return plan, problems
