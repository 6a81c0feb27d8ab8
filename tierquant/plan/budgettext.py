"""A recipe=auto budget in words, for logs and tables (not a Python dict).

`budget_text(spec)` reads the `spec` of tierquant.plan.budget.Budget (also stored in
data/plan/auto/allocation.json and metrics/predicted_size.json's `budget`): what was
asked, e.g. `4.0 bits/weight (within 0.01 below)`, `40 GiB of weights`, or
`fits 64 GiB at 32768 tokens (raised wired limit: GPU 56.0 GiB, KV cache 1.13 GiB,
overhead 2 GiB)`. No imports from the package: the size table and the plan share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GIB = 2**30


def budget_text(spec: Mapping[str, Any]) -> str:
    """What a budget `spec` asked for, in words."""
    if spec.get("bits_per_weight") is not None:
        tol = spec.get("tolerance")
        within = f" (within {tol:g} below)" if tol is not None else ""
        return f"{spec['bits_per_weight']} bits/weight{within}"
    if spec.get("gib") is not None:
        return f"{spec['gib']} GiB of weights"
    fit = spec.get("fit")
    if fit:
        parts = [f"{fit.get('wired_limit', '?')} wired limit"]
        if fit.get("gpu_limit_gib") is not None:
            parts.append(f"GPU {fit['gpu_limit_gib']:g} GiB")
        if fit.get("kv_cache_bytes") is not None:
            parts.append(f"KV cache {fit['kv_cache_bytes'] / GIB:.3g} GiB")
        if fit.get("overhead_gib") is not None:
            parts.append(f"overhead {fit['overhead_gib']:g} GiB")
        return (
            f"fits {fit.get('memory_gib')} GiB at {fit.get('context')} tokens "
            f"({parts[0]}: {', '.join(parts[1:])})"
            if len(parts) > 1
            else f"fits {fit.get('memory_gib')} GiB at {fit.get('context')} tokens ({parts[0]})"
        )
    return "no budget"
