"""Measured bit allocation: one precision per allocation group, least total damage within
a byte budget (recipe=auto).

The groups are tierquant.quality.damage's (what measure scored); everything outside
them is fixed: norms, biases and sinks bf16, the router at `budget.router`.

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

The damage table it allocates from is data/measure/damage.json
(tierquant.quality.damage.read_damage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tierquant.core.precision import BF16, Precision
from tierquant.errors import TierquantError
from tierquant.quality.damage import Group

MAX_UNITS = 200_000  # DP table width for budgets without a lower bound


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
