"""The size budget of recipe=auto, in bytes of stored weights (tierquant.plan.allocate).

Exactly one of
- `budget.bits_per_weight`: total stored bits / total parameters (predict's bits per
  weight) at most this, and at least this − BPW_TOLERANCE (so an allocation that is
  cheap in damage cannot land far under the size asked for);
- `budget.gib`: the stored weights at most this many GiB (2^30 bytes);
- `budget.fit: {memory_gib, context, wired_limit}`: the weights plus the bf16 KV cache
  at `context` tokens plus `memory.overhead_gib` within what the GPU may use on a Mac
  with `memory_gib` of unified memory under macOS's `default` wired limit or a `raised`
  one: the benchmark fit table's rule (tierquant.plan.footprint.max_weight_bytes), solved for the
  weights, so the fit table of the result says it fits at that context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from tierquant.core.gptoss import GptOssShape
from tierquant.errors import TierquantError
from tierquant.plan.footprint import (
    GIB,
    WIRED_LIMITS,
    MemoryModel,
    kv_cache_bytes,
    max_weight_bytes,
    wired_limit_gib,
)

BPW_TOLERANCE = Fraction(1, 100)


@dataclass
class FitRequest:
    """`budget.fit`: the weights may take what the fit table's memory model leaves free
    on a Mac of `memory_gib` with a `context`-token KV cache."""

    memory_gib: float | None = None
    context: int | None = None
    wired_limit: str = "raised"  # "default" or "raised" (see tierquant.plan.footprint.fit_table)


@dataclass
class BudgetRequest:
    """The size budget of `recipe=auto`: exactly one of
    `bits_per_weight`, `gib` (weights) or `fit.memory_gib` (+ `fit.context`)."""

    bits_per_weight: float | None = None
    gib: float | None = None
    fit: FitRequest = field(default_factory=FitRequest)
    router: str = "bf16"  # the router is not allocated: bf16 or 8 (gpt-oss's own 8-bit)


@dataclass(frozen=True)
class Budget:
    """Bytes the whole model's stored tensors may take (`max_bytes`), and must reach for
    a bits-per-weight budget (`min_bytes`); `spec` says what was asked, for the reports."""

    max_bytes: int
    min_bytes: int | None
    spec: dict[str, Any]


def _exact(value: float) -> Fraction:
    return Fraction(str(value))  # 3.3 means 33/10, not the nearest binary float


def check_budget(budget: BudgetRequest, key: str = "budget") -> None:
    """Everything about a budget that needs no checkpoint: exactly one kind, each value
    in range; errors name the `key`.* params."""
    given = [
        k
        for k, v in (
            ("bits_per_weight", budget.bits_per_weight),
            ("gib", budget.gib),
            ("fit", budget.fit.memory_gib),
        )
        if v is not None
    ]
    if len(given) != 1:
        raise TierquantError(
            f"params: recipe=auto needs exactly one budget: {key}.bits_per_weight, "
            f"{key}.gib or {key}.fit.memory_gib (+ {key}.fit.context), got "
            f"{', '.join(f'{key}.' + g for g in given) if given else 'none'}; e.g. "
            f"`-S {key}.bits_per_weight=3.5`"
        )
    if budget.bits_per_weight is not None and not 1 < _exact(budget.bits_per_weight) <= 16:
        raise TierquantError(
            f"params: {key}.bits_per_weight must be in (1, 16], got {budget.bits_per_weight}"
        )
    if budget.gib is not None and budget.gib <= 0:
        raise TierquantError(f"params: {key}.gib must be > 0, got {budget.gib}")
    fit = budget.fit
    if fit.memory_gib is not None:
        if fit.memory_gib <= 0:
            raise TierquantError(f"params: {key}.fit.memory_gib must be > 0, got {fit.memory_gib}")
        if fit.context is None or fit.context < 1:
            raise TierquantError(
                f"params: {key}.fit.context must be a context length >= 1 with "
                f"{key}.fit.memory_gib, got {fit.context!r}"
            )
    if fit.wired_limit not in WIRED_LIMITS:
        raise TierquantError(
            f"params: {key}.fit.wired_limit must be one of {', '.join(WIRED_LIMITS)}, "
            f"got {fit.wired_limit!r}"
        )


def resolve_budget(
    budget: BudgetRequest,
    *,
    shape: GptOssShape,
    total_params: int,
    max_positions: int,
    memory: MemoryModel,
) -> Budget:
    """The budget of `budget` (checked by `check_budget`) for a model of `shape` with
    `total_params` parameters."""
    check_budget(budget)
    if budget.bits_per_weight is not None:
        bpw = _exact(budget.bits_per_weight)
        hi = math.floor(bpw * total_params / 8)
        lo = math.ceil((bpw - BPW_TOLERANCE) * total_params / 8)
        return Budget(hi, lo, {"bits_per_weight": float(bpw), "tolerance": float(BPW_TOLERANCE)})
    if budget.gib is not None:
        return Budget(math.floor(_exact(budget.gib) * GIB), None, {"gib": budget.gib})
    fit = budget.fit
    if fit.context is None or not 1 <= fit.context <= max_positions:
        raise TierquantError(
            f"params: budget.fit.context must be a context length in 1..{max_positions} "
            f"(max_position_embeddings), got {fit.context!r}"
        )
    assert fit.memory_gib is not None
    max_bytes = max_weight_bytes(fit.memory_gib, fit.context, shape, memory, fit.wired_limit)
    spec = {
        "fit": {
            "memory_gib": fit.memory_gib,
            "context": fit.context,
            "wired_limit": fit.wired_limit,
            "gpu_limit_gib": round(wired_limit_gib(fit.memory_gib, memory, fit.wired_limit), 3),
            "overhead_gib": memory.overhead_gib,
            "kv_cache_bytes": kv_cache_bytes(shape, fit.context),
        }
    }
    if max_bytes <= 0:
        raise TierquantError(
            f"params: budget.fit: a {fit.context}-token KV cache and "
            f"{memory.overhead_gib} GiB overhead leave no room for weights in "
            f"{fit.memory_gib} GiB ({fit.wired_limit} wired limit)"
        )
    return Budget(max_bytes, None, spec)
