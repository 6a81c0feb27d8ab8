"""The size budget of recipe=auto, in bytes of stored weights (tierquant.plan.allocate).

Exactly one of
- `budget.bits_per_weight`: total stored bits / total parameters (predict's bits per
  weight) at most this, and at least this − BPW_TOLERANCE (so an allocation that is
  cheap in damage cannot land far under the size asked for);
- `budget.gib`: the stored weights at most this many GiB (2^30 bytes);
- `budget.fit: {memory_gib, context, wired_limit}`: the weights plus the bf16 KV cache
  at `context` tokens plus `benchmark.overhead_gib` within what the GPU may use on a Mac
  with `memory_gib` of unified memory under macOS's `default` wired limit or a `raised`
  one: the benchmark fit table's rule (tierquant.plan.footprint.max_weight_bytes), solved for the
  weights, so the fit table of the result says it fits at that context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from tierquant.config import BenchmarkConfig, BudgetConfig
from tierquant.core.gptoss import GptOssShape
from tierquant.errors import TierquantError
from tierquant.plan.footprint import (
    GIB,
    WIRED_LIMITS,
    kv_cache_bytes,
    max_weight_bytes,
    wired_limit_gib,
)

BPW_TOLERANCE = Fraction(1, 100)


@dataclass(frozen=True)
class Budget:
    """Bytes the whole model's stored tensors may take (`max_bytes`), and must reach for
    a bits-per-weight budget (`min_bytes`); `spec` says what was asked, for the reports."""

    max_bytes: int
    min_bytes: int | None
    spec: dict[str, Any]


def _exact(value: float) -> Fraction:
    return Fraction(str(value))  # 3.3 means 33/10, not the nearest binary float


def resolve_budget(
    budget: BudgetConfig,
    *,
    shape: GptOssShape,
    total_params: int,
    max_positions: int,
    bench: BenchmarkConfig,
) -> Budget:
    """The budget of `budget` for a model of `shape` with `total_params` parameters."""
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
            "params: recipe=auto needs exactly one budget: budget.bits_per_weight, "
            "budget.gib or budget.fit.memory_gib (+ budget.fit.context), got "
            f"{', '.join('budget.' + g for g in given) if given else 'none'}; e.g. "
            "`-S budget.bits_per_weight=3.5`"
        )
    if budget.bits_per_weight is not None:
        bpw = _exact(budget.bits_per_weight)
        if not 1 < bpw <= 16:
            raise TierquantError(
                f"params: budget.bits_per_weight must be in (1, 16], got {budget.bits_per_weight}"
            )
        hi = math.floor(bpw * total_params / 8)
        lo = math.ceil((bpw - BPW_TOLERANCE) * total_params / 8)
        return Budget(hi, lo, {"bits_per_weight": float(bpw), "tolerance": float(BPW_TOLERANCE)})
    if budget.gib is not None:
        if budget.gib <= 0:
            raise TierquantError(f"params: budget.gib must be > 0, got {budget.gib}")
        return Budget(math.floor(_exact(budget.gib) * GIB), None, {"gib": budget.gib})
    fit = budget.fit
    if fit.wired_limit not in WIRED_LIMITS:
        raise TierquantError(
            f"params: budget.fit.wired_limit must be one of {', '.join(WIRED_LIMITS)}, "
            f"got {fit.wired_limit!r}"
        )
    if fit.context is None or not 1 <= fit.context <= max_positions:
        raise TierquantError(
            f"params: budget.fit.context must be a context length in 1..{max_positions} "
            f"(max_position_embeddings), got {fit.context!r}"
        )
    assert fit.memory_gib is not None
    max_bytes = max_weight_bytes(fit.memory_gib, fit.context, shape, bench, fit.wired_limit)
    spec = {
        "fit": {
            "memory_gib": fit.memory_gib,
            "context": fit.context,
            "wired_limit": fit.wired_limit,
            "gpu_limit_gib": round(wired_limit_gib(fit.memory_gib, bench, fit.wired_limit), 3),
            "overhead_gib": bench.overhead_gib,
            "kv_cache_bytes": kv_cache_bytes(shape, fit.context),
        }
    }
    if max_bytes <= 0:
        raise TierquantError(
            f"params: budget.fit: a {fit.context}-token KV cache and "
            f"{bench.overhead_gib} GiB overhead leave no room for weights in "
            f"{fit.memory_gib} GiB ({fit.wired_limit} wired limit)"
        )
    return Budget(max_bytes, None, spec)
