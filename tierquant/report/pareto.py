"""pareto stage: this run's point on the size/quality curve, for `dvc plots` across
experiments: `metrics/pareto.json` = [{recipe, budget, bits_per_weight, kld_mean,
top1_agreement}] from validate's metrics (a one-row list: what DVC's plots read).

The sweep (README, "Measured allocation"): queue budgets and the hand recipes with
`dvc exp run --queue`, run `dvc queue start`, then `dvc plots diff $(dvc exp list
--name-only) --targets pareto_kld pareto_top1` draws one point per experiment, and
`tierquant sweep` gathers every experiment's point (from `dvc exp show --json`) into
`metrics/sweep.json`, which the card reads to say where its model sits on the curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tierquant.core.files import atomic_output, json_bytes, read_json
from tierquant.errors import TierquantError

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


# What `dvc exp show --json` holds per experiment that a sweep point needs: the headline
# quality metrics file (tierquant.report.headline) and params.yaml.
HEADLINE_QUALITY = "metrics/headline/quality.json"


def sweep_points(exp_show: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every experiment's point in `dvc exp show --json` output, sorted by bits per weight
    (the workspace and baselines too; the same point twice is kept once)."""
    points: dict[tuple, dict[str, Any]] = {}
    for baseline in exp_show:
        rev = str(baseline.get("rev"))
        entries = [
            (baseline.get("name") or (rev if rev == "workspace" else rev[:7]), baseline.get("data"))
        ]
        for exp in baseline.get("experiments") or []:
            revs = exp.get("revs") or [{}]
            entries.append((exp.get("name") or str(revs[0].get("rev"))[:7], revs[0].get("data")))
        for name, data in entries:
            data = data or {}
            quality = (data.get("metrics") or {}).get(HEADLINE_QUALITY, {}).get("data") or {}
            params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
            if not all(isinstance(quality.get(k), (int, float)) for k in ("bpw", "kld_mean")):
                continue
            recipe = (params.get("recipe") or {}).get("name", "?")
            budget = params.get("budget") if recipe == "auto" else None
            point = {
                "name": name,
                "recipe": recipe,
                "budget": _budget_label(budget),
                "bits_per_weight": quality["bpw"],
                "kld_mean": quality["kld_mean"],
                "top1_agreement": quality.get("top1"),
            }
            key = (point["recipe"], point["budget"], point["bits_per_weight"], point["kld_mean"])
            points.setdefault(key, point)
    return sorted(points.values(), key=lambda p: (p["bits_per_weight"], p["kld_mean"]))


def write_sweep(exp_show: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """`out` (metrics/sweep.json): the sweep's points; an error if there are none."""
    points = sweep_points(exp_show)
    if not points:
        raise TierquantError(
            "dvc exp show lists no experiment with quality metrics: run the sweep first "
            '(README, "The Pareto sweep")'
        )
    with atomic_output(Path(out), is_dir=False) as tmp:
        tmp.write_bytes(json_bytes(points))
    return points


def curve_position(
    points: list[dict[str, Any]], bits_per_weight: float, kld_mean: float
) -> dict[str, Any]:
    """Where a model (its bits per weight and kld_mean) sits among the sweep's `points`:
    the points no larger that beat it (lower kld_mean), and the ones it beats that are no
    smaller. On the Pareto front when nothing no larger beats it."""
    beaten_by = [
        p
        for p in points
        if p["bits_per_weight"] <= bits_per_weight + 1e-9 and p["kld_mean"] < kld_mean - 1e-12
    ]
    beats = [
        p
        for p in points
        if p["bits_per_weight"] >= bits_per_weight - 1e-9 and p["kld_mean"] > kld_mean + 1e-12
    ]
    return {"on_front": not beaten_by, "beaten_by": beaten_by, "beats": beats}
