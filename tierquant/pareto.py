"""pareto stage: this run's point on the size/quality curve, for `dvc plots` across
experiments: `metrics/pareto.json` = [{recipe, budget, bits_per_weight, kld_mean,
top1_agreement}] from validate's metrics (a one-row list: what DVC's plots read).

The sweep (README, "Measured allocation"): queue budgets and the hand recipes with
`dvc exp run --queue`, run `dvc queue start`, then
`dvc plots diff $(dvc exp list --name-only)` draws one point per experiment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import TierquantError
from .files import atomic_output, json_bytes, read_json

FIELDS = ("bits_per_weight", "kld_mean", "top1_agreement")


def pareto_point(
    *, validate_metrics: Path, recipe: str, budget: dict[str, Any] | None, out: Path
) -> list[dict[str, Any]]:
    """Write `out` (one row) from `validate_metrics`; `budget` None for a hand recipe."""
    metrics = read_json(Path(validate_metrics))
    missing = [f for f in FIELDS if not isinstance(metrics.get(f), (int, float))]
    if missing:
        raise TierquantError(
            f"{validate_metrics}: no {', '.join(missing)}; rerun the validate stage"
        )
    row: dict[str, Any] = {"recipe": recipe, "budget": _budget_label(budget)}
    row.update({f: metrics[f] for f in FIELDS})
    with atomic_output(Path(out), is_dir=False) as tmp:
        tmp.write_bytes(json_bytes([row]))
    return [row]


def _budget_label(budget: dict[str, Any] | None) -> str:
    if not budget:
        return "hand recipe"
    if budget.get("bits_per_weight") is not None:
        return f"{budget['bits_per_weight']} bpw"
    if budget.get("gib") is not None:
        return f"{budget['gib']} GiB"
    fit = budget.get("fit") or {}
    return f"fits {fit.get('memory_gib')} GiB @ {fit.get('context')} ({fit.get('wired_limit')})"
