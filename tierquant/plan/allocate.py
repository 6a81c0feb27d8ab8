"""Measured bit allocation: one precision per allocation group, least total damage within
a byte budget (recipe=auto).

Allocation groups (`allocation_groups`): per decoder layer `attn_qk` (q_proj, k_proj),
`attn_vo` (v_proj, o_proj), `experts_gate_up` (gate_proj, up_proj), `experts_down`
(down_proj); plus `embed_tokens` and `lm_head`. Everything else is fixed: norms, biases
and sinks bf16 (they cannot be quantized), the router at `budget.router` (bf16 or 8).

The choice is a multiple-choice knapsack: each group takes exactly one candidate
(bytes b, damage d); minimise Σ d subject to Σ b ≤ B (and, for a bits-per-weight budget,
Σ b ≥ B_min). `solve` is an exact dynamic programme over bytes counted in units of
`resolution` r, each group's bytes rounded UP to whole units: a solution whose units fit
`floor(B / r)` has Σ b ≤ r · Σ ceil(b / r) ≤ B, so the realized size never exceeds the
budget, whatever r. Its damage is the least among all solutions of the rounded problem,
which contains every solution with Σ b ≤ B − G·(r − 1) (G groups: rounding adds < r per
group), so it lies between the exact optimum at B and the exact optimum at
B − G·(r − 1); with r = 1 it IS the exact optimum (tests check both against brute force).
The lower bound is kept the same way: units ≥ ceil((B_min + G·(r − 1)) / r) imply
Σ b ≥ B_min.

The damage table it allocates from is data/measure/damage.json (`read_damage`; written
by tierquant.quality.measure, format MEASURE_FORMAT).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from tierquant.core.files import read_json
from tierquant.core.gptoss import EXPERT_KINDS, GptOssShape, Weight, mlx_weights
from tierquant.core.precision import BF16, Precision, parse_precision
from tierquant.errors import TierquantError

LAYER_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_qk": ("q_proj", "k_proj"),
    "attn_vo": ("v_proj", "o_proj"),
    "experts_gate_up": ("gate_proj", "up_proj"),
    "experts_down": ("down_proj",),
}
GLOBAL_GROUPS = ("embed_tokens", "lm_head")
MAX_UNITS = 200_000  # DP table width for budgets without a lower bound
MEASURE_FORMAT = 1
DAMAGE = "damage.json"  # inside data/measure


def read_damage(measure_dir: Path) -> dict[str, Any]:
    """data/measure/damage.json, checked."""
    path = Path(measure_dir) / DAMAGE
    if not path.is_file():
        raise TierquantError(f"{path}: missing; run the measure stage (`dvc repro measure`)")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != MEASURE_FORMAT:
        raise TierquantError(f"{path}: not a damage table; rerun the measure stage")
    return data


@dataclass(frozen=True)
class Group:
    """One allocation group: `name` is `layers.<i>.<kind>` or `embed_tokens`/`lm_head`."""

    name: str
    kind: str  # attn_qk, attn_vo, experts_gate_up, experts_down, embed_tokens, lm_head
    layer: int | None
    weights: tuple[Weight, ...]

    @property
    def is_experts(self) -> bool:
        return all(w.kind in EXPERT_KINDS for w in self.weights)

    def allows(self, precision: Precision) -> bool:
        """mxfp4 keeps the original's expert bytes: expert groups only."""
        return precision.mode != "mxfp4" or self.is_experts

    def bits(self, precision: Precision) -> Fraction:
        """Stored bits of the group's matrices at `precision` (predict's formula)."""
        return sum((w.numel * precision.weight_bits(w.kind) for w in self.weights), Fraction(0))

    def nbytes(self, precision: Precision) -> int:
        b = self.bits(precision) / 8
        if b.denominator != 1:
            raise TierquantError(f"group {self.name}: {precision.label} is not whole bytes")
        return int(b)


def allocation_groups(shape: GptOssShape) -> tuple[list[Group], list[Weight]]:
    """(groups in checkpoint order, the weights outside every group: vectors, router)."""
    weights = mlx_weights(shape)
    by_kind = {k: g for g, kinds in LAYER_GROUPS.items() for k in kinds}
    members: dict[str, list[Weight]] = {}
    info: dict[str, tuple[str, int | None]] = {}
    fixed: list[Weight] = []
    for w in weights:
        if w.kind in GLOBAL_GROUPS:
            key, kind, layer = w.kind, w.kind, None
        elif w.kind in by_kind:
            kind, layer = by_kind[w.kind], w.layer
            key = f"layers.{layer}.{kind}"
        else:
            fixed.append(w)
            continue
        members.setdefault(key, []).append(w)
        info[key] = (kind, layer)
    groups = [Group(k, info[k][0], info[k][1], tuple(ws)) for k, ws in members.items()]
    return groups, fixed


def parse_candidates(candidates: Sequence[object], group_size: int) -> list[Precision]:
    """`measure.candidates` → Precisions (affine bits at `group_size`, mxfp4, bf16)."""
    out: list[Precision] = []
    for i, c in enumerate(candidates):
        p = parse_precision(c, f"measure.candidates[{i}]", group_size)
        if p.mode == "affine" and p.bits not in TIER_BITS:
            raise TierquantError(
                f"params: measure.candidates[{i}]: {c!r}; affine candidates are "
                f"{', '.join(map(str, TIER_BITS))}"
            )
        if p in out:
            raise TierquantError(f"params: measure.candidates[{i}]: {c!r} is listed twice")
        out.append(p)
    if not out:
        raise TierquantError("params: measure.candidates is empty")
    return out


# --- tiers keyed by precision ------------------------------------------------------------

TIER_BITS = (2, 3, 4, 5, 6, 8)


def tier_name(precision: Precision) -> str:
    """The recipe=auto tier a precision's tensors go to: bf16, q2 … q8, mxfp4."""
    if precision.mode == "affine":
        return f"q{precision.bits}"
    return precision.mode


AUTO_TIERS = ("bf16", *(f"q{b}" for b in TIER_BITS), "mxfp4")


def check_auto_tiers(precisions: dict[str, Precision], group_size: int) -> None:
    """recipe=auto's `tiers:` must be exactly AUTO_TIERS, each at its own precision."""
    if set(precisions) != set(AUTO_TIERS):
        raise TierquantError(
            f"params: recipe=auto needs tiers {', '.join(AUTO_TIERS)} (tiers keyed by "
            f"precision), got {', '.join(precisions)}; recompose with `-S recipe=auto`"
        )
    for name, p in precisions.items():
        if tier_name(p) != name:
            raise TierquantError(
                f"params: tiers.{name} is {p.label}, but recipe=auto's tier {name!r} holds "
                f"the tensors allocated {name}; change the budget, not the tier"
            )


# --- the knapsack ------------------------------------------------------------------------


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]  # per group, the index of its option
    nbytes: int
    damage: float
    resolution: int


def solve(
    options: Sequence[Sequence[tuple[int, float]]],
    max_bytes: int,
    *,
    min_bytes: int | None = None,
    resolution: int = 1,
) -> Solution:
    """Exact multiple-choice knapsack on bytes rounded up to `resolution` (module doc).

    `options[g]` lists (bytes, damage) of group g's candidates. Raises TierquantError when
    no choice fits.
    """
    r = max(1, int(resolution))
    g_count = len(options)
    hi = max_bytes // r
    lo = 0 if min_bytes is None else -(-(min_bytes + g_count * (r - 1)) // r)
    if hi < 0 or lo > hi:
        raise TierquantError(_no_fit(options, max_bytes, min_bytes))
    inf = math.inf
    best = np.full(hi + 1, inf)
    best[0] = 0.0
    picks = np.zeros((g_count, hi + 1), dtype=np.int16)
    for g, opts in enumerate(options):
        new = np.full(hi + 1, inf)
        pick = picks[g]
        for k, (nbytes, damage) in enumerate(opts):
            c = -(-int(nbytes) // r)
            if c > hi:
                continue
            cand = best[: hi + 1 - c] + float(damage)
            better = cand < new[c:]
            new[c:][better] = cand[better]
            pick[c:][better] = k
        best = new
    window = best[lo : hi + 1]
    if not np.isfinite(window).any():
        raise TierquantError(_no_fit(options, max_bytes, min_bytes))
    u = lo + int(np.argmin(window))  # first minimum: ties go to the smaller size
    choice = []
    for g in range(g_count - 1, -1, -1):
        k = int(picks[g][u])
        choice.append(k)
        u -= -(-int(options[g][k][0]) // r)
    choice.reverse()
    nbytes = sum(int(options[g][k][0]) for g, k in enumerate(choice))
    damage = float(sum(float(options[g][k][1]) for g, k in enumerate(choice)))
    assert nbytes <= max_bytes and (min_bytes is None or nbytes >= min_bytes)
    return Solution(tuple(choice), nbytes, damage, r)


def _no_fit(options, max_bytes: int, min_bytes: int | None) -> str:
    smallest = sum(min(b for b, _ in o) for o in options)
    largest = sum(max(b for b, _ in o) for o in options)
    if smallest > max_bytes:
        return (
            f"budget: {max_bytes:,} bytes for the allocated tensors, but even the smallest "
            f"candidates take {smallest:,}; raise the budget or add smaller candidates "
            "(measure.candidates)"
        )
    if min_bytes is not None and largest < min_bytes:
        return (
            f"budget: the largest candidates take {largest:,} bytes, below the "
            f"{min_bytes:,} a bits-per-weight budget within its tolerance needs; lower "
            "budget.bits_per_weight or add larger candidates (measure.candidates)"
        )
    return (
        f"budget: no choice of candidates lands between {min_bytes or 0:,} and "
        f"{max_bytes:,} bytes; change the budget or the candidates"
    )


def default_resolution(max_bytes: int, min_bytes: int | None, groups: int) -> int:
    """Unit size: fine enough that a [min, max] window holds ≥ 3G units (so rounding never
    empties it), coarse enough that the table stays ≤ MAX_UNITS wide when possible."""
    r = max(1, max_bytes // MAX_UNITS)
    if min_bytes is not None:
        r = min(r, max(1, (max_bytes - min_bytes) // (4 * max(1, groups))))
    return r


# --- allocation --------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    precision: dict[str, Precision]  # group name → chosen precision
    damage: dict[str, float]  # group name → its measured damage at that precision
    nbytes: int  # allocated groups' bytes
    resolution: int


def allocate(
    groups: Sequence[Group],
    damage: dict[str, dict[str, float]],
    candidates: Sequence[Precision],
    *,
    max_bytes: int,
    min_bytes: int | None = None,
    resolution: int | None = None,
) -> Allocation:
    """Choose each group's precision (one of `candidates` it allows) with the least total
    damage, `damage[group][precision label]`, within [min_bytes, max_bytes] (the groups'
    own bytes: the fixed tensors already taken off)."""
    options: list[list[tuple[int, float]]] = []
    precisions: list[list[Precision]] = []
    for g in groups:
        opts, ps = [], []
        for p in candidates:
            if not g.allows(p):
                continue
            d = 0.0 if p == BF16 else damage.get(g.name, {}).get(p.label)
            if d is None or not math.isfinite(d):
                raise TierquantError(
                    f"data/measure has no damage for group {g.name} at {p.label}; rerun the "
                    "measure stage (are measure.candidates and quant.group_size the same?)"
                )
            opts.append((g.nbytes(p), max(0.0, float(d))))
            ps.append(p)
        options.append(opts)
        precisions.append(ps)
    if resolution is None:
        resolution = default_resolution(max_bytes, min_bytes, len(groups))
    sol = solve(options, max_bytes, min_bytes=min_bytes, resolution=resolution)
    picked = list(enumerate(zip(groups, sol.choice, strict=True)))
    chosen = {g.name: precisions[i][k] for i, (g, k) in picked}
    dmg = {g.name: options[i][k][1] for i, (g, k) in picked}
    return Allocation(chosen, dmg, sol.nbytes, sol.resolution)
