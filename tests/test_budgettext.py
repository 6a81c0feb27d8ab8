"""Budgets and empty tiers in the logs: words, not Python dicts or 0.000 bits/weight."""

from __future__ import annotations

from tierquant.plan.budgettext import budget_text
from tierquant.plan.size import format_table


def test_budget_text():
    assert budget_text({"bits_per_weight": 4.0, "tolerance": 0.01}) == (
        "4.0 bits/weight (within 0.01 below)"
    )
    assert budget_text({"gib": 40}) == "40 GiB of weights"
    fit = {
        "memory_gib": 64,
        "context": 32768,
        "wired_limit": "raised",
        "gpu_limit_gib": 56.0,
        "overhead_gib": 2,
        "kv_cache_bytes": 1213661184,
    }
    assert budget_text({"fit": fit}) == (
        "fits 64 GiB at 32768 tokens (raised wired limit: GPU 56 GiB, KV cache 1.13 GiB, "
        "overhead 2 GiB)"
    )


def _row(precision: str, params: int, nbytes: int) -> dict:
    bpw = 8 * nbytes / params if params else 0.0
    return {
        "precision": precision,
        "params": params,
        "params_pct": 50.0 if params else 0.0,
        "bytes": nbytes,
        "gib": nbytes / 2**30,
        "bits_per_weight": bpw,
    }


def test_size_table_says_empty_and_prints_the_budget_in_words():
    report = {
        "tiers": {"q3": _row("3-bit g64", 1000, 437), "q8": _row("8-bit g64", 0, 0)},
        "total": _row("", 1000, 437),
        "original": {"bytes": 600, "gib": 0.0, "bits_per_weight": 4.8},
        "budget": {
            "bits_per_weight": 3.5,
            "tolerance": 0.01,
            "max_bytes": 437,
            "max_gib": 0.0,
            "slack_bytes": 0,
            "predicted_damage": 0.1,
        },
    }
    lines = format_table(report)
    q8 = next(line for line in lines if line.startswith("q8"))
    assert "empty" in q8 and "0.000" not in q8
    budget = lines[-1]
    assert budget.startswith("budget 3.5 bits/weight (within 0.01 below): at most 437 bytes")
    assert "{" not in budget
