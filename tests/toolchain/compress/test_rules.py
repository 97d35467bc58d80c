"""Per-layer rules: ordered, first full match wins, `skip` keeps a layer float (table-driven, no model)."""

import re

import pytest

from models.errors import EdgesmithError
from toolchain.compress.rules import bits_for, parse_rules, resolve

NAMES = ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj", "layers.1.self_attn.q_proj",
         "layers.10.mlp.down_proj", "lm_head"]


@pytest.mark.parametrize("rules, default, expected", [
    # no rules: everything at the default
    ({}, 4, [4, 4, 4, 4, 4]),
    # the example
    ({"lm_head": 8, r"layers\.0\..*": 8, ".*": 4}, 4, [8, 8, 4, 4, 8]),
    # first match wins even when a later rule is more specific
    ({".*": 4, "lm_head": 8}, 8, [4, 4, 4, 4, 4]),
    # full match: "layers.1" does not catch layers.10
    ({r"layers\.1\..*": "skip"}, 4, [4, 4, None, 4, 4]),
    # skip, and string bit widths from a CLI
    ({r".*down_proj": "skip", "lm_head": "8"}, 4, [4, None, 4, None, 8]),
    # a pattern that matches only part of a name does not apply
    ({"q_proj": 8}, 4, [4, 4, 4, 4, 4]),
])
def test_rules_resolve(rules, default, expected, recwarn):
    plan, _ = resolve(NAMES, rules, default)
    assert [plan[n] for n in NAMES] == expected


@pytest.mark.parametrize("rules, expected", [
    ({}, 4),                                          # the default ".*" takes the embedding too
    ({".*": 4}, 4),
    ({"embed_tokens": "skip", ".*": 4}, None),        # opt out
    ({"embed_tokens": 8}, 8),
    ({r"layers\..*": 8, "lm_head": 8}, 4),            # rules for other layers leave it alone
    ({"embed": 8}, 4),                                # a partial name does not apply
])
def test_rules_select_the_token_embedding(rules, expected, recwarn):
    plan, _ = resolve(NAMES + ["embed_tokens"], rules, 4)
    assert plan["embed_tokens"] == expected
    assert bits_for("embed_tokens", rules, 4) == expected


def test_rules_keep_order_from_pairs():
    assert parse_rules([("lm_head", 8), (".*", "skip")]) == (("lm_head", 8), (".*", "skip"))


def test_rule_matching_no_layer_warns_and_is_reported():
    with pytest.warns(UserWarning, match=re.escape(r"rule 'layers\.9\..*' matches no layer")):
        plan, problems = resolve(NAMES, {r"layers\.9\..*": 8, ".*": 4}, 4)
    assert problems == [r"rule 'layers\.9\..*' matches no layer"]
    assert set(plan.values()) == {4}


@pytest.mark.parametrize("rules, message", [
    ({"lm_head": 3}, r"rule 'lm_head': value 3 is not allowed; allowed: 4, 5, 8, 'skip'"),
    ({"lm_head": "float"}, r"value 'float' is not allowed; allowed: 4, 5, 8, 'skip'"),
    ({"(": 4}, r"rule '\(': not a valid regular expression"),
    ([("lm_head",)], r"expected a \(regex, value\) pair"),
])
def test_bad_rules_are_one_clear_line(rules, message):
    with pytest.raises(EdgesmithError, match=message):
        parse_rules(rules)
