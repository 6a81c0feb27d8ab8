"""A model's point on the size/quality curve, and that curve drawn.

The pareto stage writes this run's point, `metrics/pareto.json` = [{recipe, budget,
bits_per_weight, kld_mean, top1_agreement}] from validate's metrics (a one-row list: what
DVC's `pareto_kld`/`pareto_top1` plots read across experiments). The sweep
(tierquant.report.sweep, docs/sweep.md) gathers every experiment's point into
`<paths.sweep>/points.json`; the card reads that file to say where its model sits on the
curve (`curve_position`), and both draw it with `curve_chart`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tierquant.core.files import atomic_output, json_bytes, read_json
from tierquant.errors import TierquantError

FIELDS = ("bits_per_weight", "kld_mean", "top1_agreement")
# The sweep's points in paths.sweep (a folder: tierquant.report.sweep says why).
POINTS = "points.json"
# The charts: metric -> (title, axis label, lower is better).
METRICS: dict[str, tuple[str, str, bool]] = {
    "kld_mean": ("KLD mean", "KLD mean vs the original (nats/token)", True),
    "top1_agreement": ("Top-1 agreement", "top-1 agreement with the original", False),
}


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


def front(points: list[dict[str, Any]], metric: str = "kld_mean") -> list[dict[str, Any]]:
    """The Pareto front of `points` for `metric` (METRICS says which way is better): the
    points no point at most as large beats, sorted by bits per weight."""
    lower = METRICS[metric][2]

    def better(a: float, b: float) -> bool:
        return a < b - 1e-12 if lower else a > b + 1e-12

    have = [p for p in points if isinstance(p.get(metric), (int, float))]
    return sorted(
        (
            p
            for p in have
            if not any(
                q["bits_per_weight"] <= p["bits_per_weight"] + 1e-9 and better(q[metric], p[metric])
                for q in have
            )
        ),
        key=lambda p: p["bits_per_weight"],
    )


def curve_chart(
    points: list[dict[str, Any]],
    out: Path,
    *,
    metric: str = "kld_mean",
    highlight: tuple[float, float] | None = None,
) -> bool:
    """`metric` against bits per weight as a PNG: every point labelled by its `name`, the
    Pareto front joined, `highlight` (bits per weight, value: a card's own model) starred.
    Rendered offline (matplotlib's Agg, no metadata: the same points give the same
    bytes). False (nothing written) when no point has `metric`."""
    have = [p for p in points if isinstance(p.get(metric), (int, float))]
    if not have:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, label, _ = METRICS[metric]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    best = front(have, metric)
    ax.plot(
        [p["bits_per_weight"] for p in best],
        [p[metric] for p in best],
        "-",
        color="C0",
        alpha=0.4,
        label="Pareto front",
    )
    ax.scatter([p["bits_per_weight"] for p in have], [p[metric] for p in have], color="C0")
    for p in have:
        ax.annotate(
            str(p.get("name", "")),
            (p["bits_per_weight"], p[metric]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    if highlight is not None:
        ax.scatter(
            [highlight[0]],
            [highlight[1]],
            marker="*",
            s=220,
            color="C3",
            zorder=3,
            label="this model",
        )
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(label)
    ax.set_title(f"{title} vs bits per weight")
    ax.margins(x=0.1, y=0.1)  # room for the labels
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    with atomic_output(out, is_dir=False) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return True
