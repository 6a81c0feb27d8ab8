"""Recipes: rules that put every tensor of the model (mlx-lm names) into one tier.

A recipe (`recipe:` in params, from conf/recipe/<name>.yaml) maps tier name -> rules.
A rule selects tensors (`tierquant.core.gptoss.Weight`) by any combination of

- `kinds`: list of gptoss.KINDS (`q_proj`, `norm`, `bias`, `gate_proj`, ...);
- `names`: fnmatch globs on the tensor name (case-sensitive);
- `layers`: absolute `[start, stop)` layer ranges;
- `position`: `edge` or `middle` (see `is_edge` and `recipe.edge_layers`);
- `layer_types`: `sliding_attention` / `full_attention`;
- `stride`: `{step, offsets}`: layers whose index counted from the first middle layer,
  modulo `step`, is one of `offsets` (llama.cpp's / mlx-lm's "every third layer").

`optional: true` lets a rule match nothing: a depth-dependent rule (mlx-lm's "every
third middle layer") has no layer to select in a shallow model, where the rule it
transcribes simply selects nothing.

All given fields must match (AND); a rule with no field is an error; a tensor outside
the decoder layers (embed_tokens, the final norm, lm_head) never matches `layers`,
`position`, `layer_types` or `stride`. The rules of a tier are OR-ed; a tensor matched
by no tier or by two tiers is an error, as is a rule that matches nothing (unless it is
`optional`).

Bits live elsewhere: `tiers:` gives each tier a precision (tierquant.core.precision).
The rule schema (RuleConfig, RecipeConfig) lives here, with the rules; tierquant.config
uses it for `recipe:` in params.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tierquant.core.gptoss import KINDS, LAYER_TYPES, Weight
from tierquant.core.precision import check_tier_name
from tierquant.errors import TierquantError

POSITIONS = ("edge", "middle")


# --- the rule schema (`recipe:` in params) -------------------------------------------------


@dataclass
class StrideConfig:
    """Layers whose index, counted from the first middle layer, mod `step` is in `offsets`."""

    step: int
    offsets: list[int]


@dataclass
class RuleConfig:
    """One rule of a recipe tier: every selector given must match (see the module doc)."""

    kinds: list[str] | None = None  # from tierquant.core.gptoss.KINDS
    names: list[str] | None = None  # fnmatch globs on the tensor name
    layers: list[list[int]] | None = None  # absolute [start, stop) pairs
    position: str | None = None  # "edge" or "middle" (edge_layers)
    layer_types: list[str] | None = None  # sliding_attention / full_attention
    stride: StrideConfig | None = None
    optional: bool = False  # may match no tensor (a depth-dependent rule; module doc)


@dataclass
class RecipeConfig:
    """Which tensors form which tier (conf/recipe/<name>.yaml); bits live in `tiers`."""

    name: str = "seed"
    edge_layers: str = "1/6"  # first and last this fraction of the layers are "edge"
    # tier -> rules; typed into RuleConfig by `typed_rules` at load (OmegaConf does not
    # type dataclasses inside a list inside a dict).
    tiers: dict[str, list[RuleConfig]] = field(default_factory=dict)
    # true (recipe=auto): no rules; plan gives each allocation group the precision
    # that data/measure + `budget` choose (tierquant.plan.allocate), tiers keyed by precision
    allocate: bool = False
    # dvc.yaml's foreach lists, so that a stage exists only for the recipes that need it:
    # a hand recipe plans by its rules (plan@rules) and measures nothing; recipe=auto
    # (allocate) plans from measured damage (calibration@damage, measure@damage,
    # allocate@damage) and has no plan@rules.
    plan: list[str] = field(default_factory=lambda: ["rules"])
    allocation: list[str] = field(default_factory=list)


# --- recipe validation -------------------------------------------------------------------


def parse_fraction(text: object, key: str = "recipe.edge_layers") -> Fraction:
    """`"1/6"` -> Fraction(1, 6), exactly; between 0 and 1/2 inclusive."""
    try:
        value = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise TierquantError(
            f"params: {key} must be a fraction such as '1/6', got {text!r}"
        ) from None
    if not 0 <= value <= Fraction(1, 2):
        raise TierquantError(f"params: {key} must be between 0 and 1/2, got {text!r}")
    return value


def typed_rules(raw: Mapping[str, Any], key: str = "recipe.tiers") -> dict[str, list[RuleConfig]]:
    """Turn `recipe.tiers` (tier -> list of rule mappings) into RuleConfig objects.

    OmegaConf does not type-check dataclasses inside a list inside a dict, so each rule
    is merged onto the RuleConfig schema here; a bad key or type names
    `recipe.tiers.<tier>[<i>].<field>`.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise TierquantError(f"params: {key} must map tier names to lists of rules")
    out: dict[str, list[RuleConfig]] = {}
    for tier, rules in raw.items():
        tkey = f"{key}.{tier}"
        check_tier_name(str(tier), tkey)
        if isinstance(rules, Mapping) or not isinstance(rules, Sequence) or not rules:
            raise TierquantError(f"params: {tkey} must be a non-empty list of rules")
        typed: list[RuleConfig] = []
        for i, rule in enumerate(rules):
            rkey = f"{tkey}[{i}]"
            if isinstance(rule, RuleConfig):
                typed.append(rule)
                continue
            if not isinstance(rule, Mapping):
                raise TierquantError(f"params: {rkey} must be a mapping of selectors")
            try:
                merged = OmegaConf.merge(OmegaConf.structured(RuleConfig), dict(rule))
                typed.append(OmegaConf.to_object(merged))  # type: ignore[arg-type]
            except OmegaConfBaseException as e:
                sub = getattr(e, "full_key", None)
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise TierquantError(
                    f"params: invalid rule {rkey}{f'.{sub}' if sub else ''}: {msg}"
                ) from None
        out[str(tier)] = typed
    return out


def check_rule(rule: RuleConfig, key: str) -> None:
    """Each selector's values are known; an unknown one raises, naming `key.<field>`."""
    if not any(
        getattr(rule, f) is not None
        for f in ("kinds", "names", "layers", "position", "layer_types", "stride")
    ):
        raise TierquantError(
            f"params: {key} has no selector (kinds, names, layers, position, layer_types, "
            "stride); a rule must say what it selects"
        )
    for field_name, allowed in (("kinds", KINDS), ("layer_types", LAYER_TYPES)):
        values = getattr(rule, field_name)
        if values is None:
            continue
        if not values:
            raise TierquantError(f"params: {key}.{field_name} is empty (omit it instead)")
        for v in values:
            if v not in allowed:
                raise TierquantError(
                    f"params: {key}.{field_name}: unknown value {v!r}; one of {', '.join(allowed)}"
                )
    if rule.names is not None and not rule.names:
        raise TierquantError(f"params: {key}.names is empty (omit it instead)")
    if rule.position is not None and rule.position not in POSITIONS:
        raise TierquantError(
            f"params: {key}.position: unknown value {rule.position!r}; one of "
            f"{', '.join(POSITIONS)}"
        )
    if rule.layers is not None:
        if not rule.layers:
            raise TierquantError(f"params: {key}.layers is empty (omit it instead)")
        for j, pair in enumerate(rule.layers):
            if len(pair) != 2 or not 0 <= pair[0] < pair[1]:
                raise TierquantError(
                    f"params: {key}.layers[{j}] must be a [start, stop) pair with "
                    f"0 <= start < stop, got {list(pair)}"
                )
    if rule.stride is not None:
        step, offsets = rule.stride.step, rule.stride.offsets
        if step < 1 or not offsets or any(not 0 <= o < step for o in offsets):
            raise TierquantError(
                f"params: {key}.stride needs step >= 1 and offsets in [0, step), "
                f"got step {step}, offsets {list(offsets)}"
            )


def check_recipe(recipe: RecipeConfig) -> None:
    """Validate a recipe that has gone through `typed_rules` (at config load)."""
    if not recipe.name:
        raise TierquantError("params: recipe.name must not be empty")
    if recipe.allocate and recipe.tiers:
        raise TierquantError(
            "params: recipe.allocate is true (recipe=auto): the plan allocates from "
            "data/measure and `budget`, so recipe.tiers must be empty"
        )
    stages = (["rules"], []) if not recipe.allocate else ([], ["damage"])
    if (list(recipe.plan), list(recipe.allocation)) != stages:
        raise TierquantError(
            f"params: recipe.plan / recipe.allocation must be {stages[0]} / {stages[1]} "
            f"for a recipe with allocate={str(recipe.allocate).lower()} (they say which "
            f"stages dvc.yaml defines), got {list(recipe.plan)} / {list(recipe.allocation)}"
        )
    parse_fraction(recipe.edge_layers)
    for tier, rules in recipe.tiers.items():
        for i, rule in enumerate(rules):
            check_rule(rule, f"recipe.tiers.{tier}[{i}]")


# --- matching ----------------------------------------------------------------------------


def edge_bounds(num_layers: int, edge_layers: Fraction) -> tuple[int, int]:
    """(first middle layer, first trailing edge layer) for `num_layers` layers.

    A layer is an edge layer if `layer < floor(n*f)` or `layer >= floor(n*(1-f))`, the
    convention of llama.cpp and mlx-lm's mixed recipes (f = 1/8 there); with f = 1/6 it
    gives the first and last 6 of 36 layers (120b), 4 of 24 (20b), 1 of 6 (tiny).
    Computed with Fractions: no float rounding.
    """
    lo = (num_layers * edge_layers).numerator // (num_layers * edge_layers).denominator
    hi_f = num_layers * (1 - edge_layers)
    return lo, hi_f.numerator // hi_f.denominator


def is_edge(layer: int, num_layers: int, edge_layers: Fraction) -> bool:
    """Whether decoder layer `layer` of `num_layers` is an edge layer (see edge_bounds)."""
    lo, hi = edge_bounds(num_layers, edge_layers)
    return layer < lo or layer >= hi


def rule_matches(rule: RuleConfig, weight: Weight, num_layers: int, edge_layers: Fraction) -> bool:
    """Whether every selector the rule gives matches `weight` (AND)."""
    if rule.kinds is not None and weight.kind not in rule.kinds:
        return False
    if rule.names is not None and not any(
        fnmatch.fnmatchcase(weight.name, pattern) for pattern in rule.names
    ):
        return False
    layered = (
        rule.layers is not None
        or rule.position is not None
        or rule.layer_types is not None
        or rule.stride is not None
    )
    if not layered:
        return True
    layer = weight.layer
    if layer is None:
        return False
    if rule.layers is not None and not any(start <= layer < stop for start, stop in rule.layers):
        return False
    if rule.layer_types is not None and weight.layer_type not in rule.layer_types:
        return False
    if rule.position is not None:
        position = "edge" if is_edge(layer, num_layers, edge_layers) else "middle"
        if position != rule.position:
            return False
    if rule.stride is not None:
        first_middle, _ = edge_bounds(num_layers, edge_layers)
        if (layer - first_middle) % rule.stride.step not in rule.stride.offsets:
            return False
    return True


def describe_rule(rule: RuleConfig) -> str:
    """A rule in one line, as written in the recipe: `{kinds: [q_proj], position: edge}`."""
    parts = []
    for f in ("kinds", "names", "layers", "position", "layer_types"):
        value = getattr(rule, f)
        if value is not None:
            parts.append(f"{f}: {_flow(value)}")
    if rule.stride is not None:
        parts.append(f"stride: {{step: {rule.stride.step}, offsets: {_flow(rule.stride.offsets)}}}")
    if rule.optional:
        parts.append("optional: true")
    return "{" + ", ".join(parts) + "}"


def _flow(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return str(value)


def _where(weight: Weight, num_layers: int, edge_layers: Fraction) -> str:
    if weight.layer is None:
        return f"kind {weight.kind}, outside the layers"
    position = "edge" if is_edge(weight.layer, num_layers, edge_layers) else "middle"
    return f"kind {weight.kind}, layer {weight.layer} ({weight.layer_type}, {position})"


def assign(
    weights: Sequence[Weight], recipe: RecipeConfig, num_layers: int
) -> dict[str, list[Weight]]:
    """Tier name -> its weights (in checkpoint order), every weight in exactly one tier.

    Raises TierquantError naming the tensor (matched by no tier, or by two, with the
    tier, rule index and rule) or the rule (one that matches nothing).
    """
    edge = parse_fraction(recipe.edge_layers)
    rules = [
        (tier, i, rule)
        for tier, tier_rules in recipe.tiers.items()
        for i, rule in enumerate(tier_rules)
    ]
    used = [False] * len(rules)
    out: dict[str, list[Weight]] = {tier: [] for tier in recipe.tiers}
    unassigned: list[Weight] = []
    for w in weights:
        hits = [
            k for k, (_, _, rule) in enumerate(rules) if rule_matches(rule, w, num_layers, edge)
        ]
        for k in hits:
            used[k] = True
        tiers = list(dict.fromkeys(rules[k][0] for k in hits))
        if not tiers:
            unassigned.append(w)
        elif len(tiers) > 1:
            first = {t: next(k for k in hits if rules[k][0] == t) for t in tiers}
            described = " and ".join(
                f"recipe.tiers.{t}[{rules[k][1]}] {describe_rule(rules[k][2])}"
                for t, k in first.items()
            )
            raise TierquantError(
                f"recipe {recipe.name!r}: tensor {w.name!r} "
                f"({_where(w, num_layers, edge)}) is matched by {len(tiers)} tiers: "
                f"{described}; make the tiers' rules disjoint"
            )
        else:
            out[tiers[0]].append(w)
    if unassigned:
        w = unassigned[0]
        raise TierquantError(
            f"recipe {recipe.name!r}: tensor {w.name!r} ({_where(w, num_layers, edge)}) is "
            f"matched by no tier's rule ({len(unassigned)} tensor(s) unassigned); add a rule "
            "for it under recipe.tiers"
        )
    for k, (tier, i, rule) in enumerate(rules):
        if not used[k] and not rule.optional:
            lo, hi = edge_bounds(num_layers, edge)
            raise TierquantError(
                f"recipe {recipe.name!r}: rule recipe.tiers.{tier}[{i}] {describe_rule(rule)} "
                f"matches no tensor of this model ({num_layers} layers; edge layers "
                f"< {lo} and >= {hi} with edge_layers {recipe.edge_layers}); fix or remove it, "
                "or mark it `optional: true` if it may select nothing at this depth"
            )
    return out
