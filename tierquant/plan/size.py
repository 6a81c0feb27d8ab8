"""The size report: params, bytes, GiB and bits per weight per tier and in total, against
the original checkpoint.

One layout for both the prediction (tierquant.plan.predict, from the plan and the bits) and
the measurement (tierquant.build.assemble, from the bytes written), so the two files compare
key for key: `tiers.<tier>` {precision, params, params_pct, bytes, bytes_pct, gib,
bits_per_weight}, `total` {params, bytes, gib, bits_per_weight}, `original` {bytes, gib,
bits_per_weight} and `ratio_to_original` (total bytes / the original's).
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from tierquant.core.precision import Precision, check_quantizable
from tierquant.plan.budgettext import budget_text

GIB = 1 << 30  # bytes in a GiB: the one definition


def tier_size(tier: str, plan: dict[str, Any], precision: Precision) -> tuple[int, Fraction]:
    """(numel, exact bits) of one tier's tensors at `precision`; refuses a tensor that
    cannot take it (naming the tier, the tensor and what to do)."""
    numel, bits = 0, Fraction(0)
    for t in plan["tensors"]:
        check_quantizable(tier, precision, name=t["name"], kind=t["kind"], shape=t["shape"])
        n = int(t["numel"])
        numel += n
        bits += n * precision.weight_bits(t["kind"])
    return numel, bits


def _bytes(value: Fraction | int) -> int | float:
    value = Fraction(value)
    return int(value) if value.denominator == 1 else float(value)


def size_report(
    tiers: Mapping[str, tuple[str, int, Fraction | int]], original_bytes: int
) -> dict[str, Any]:
    """`tiers`: tier -> (precision label, params, bytes); the report (see module doc)."""
    total_params = sum(params for _, params, _ in tiers.values())
    total_bytes = sum((Fraction(b) for _, _, b in tiers.values()), Fraction(0))
    if not total_params:
        raise ValueError("size_report: no params")

    def row(params: int, nbytes: Fraction) -> dict[str, Any]:
        return {
            "params": params,
            "bytes": _bytes(nbytes),
            "gib": round(float(nbytes) / GIB, 3),
            "bits_per_weight": round(float(8 * nbytes / params), 6) if params else 0.0,
        }

    return {
        "tiers": {
            tier: {
                "precision": label,
                **row(params, Fraction(nbytes)),
                "params_pct": round(100 * params / total_params, 4),
                "bytes_pct": round(float(100 * Fraction(nbytes) / total_bytes), 4),
            }
            for tier, (label, params, nbytes) in tiers.items()
        },
        "total": row(total_params, total_bytes),
        "original": {
            "bytes": original_bytes,
            "gib": round(original_bytes / GIB, 3),
            "bits_per_weight": round(original_bytes * 8 / total_params, 6),
        },
        "ratio_to_original": round(float(total_bytes / original_bytes), 6),
    }


def format_table(report: Mapping[str, Any]) -> list[str]:
    """The report as a fixed-width table, one string per line."""
    head = (
        f"{'tier':<12} {'precision':<11} {'params':>16} {'%':>7} {'bytes':>16} "
        f"{'GiB':>8} {'bpw':>7}"
    )
    lines = [head, "-" * len(head)]
    for tier, r in report["tiers"].items():
        if not r["params"]:  # recipe=auto's tiers are fixed; the plan may leave one empty
            lines.append(f"{tier:<12} {r['precision']:<11} {'empty: no tensors':>16}")
            continue
        lines.append(
            f"{tier:<12} {r['precision']:<11} {r['params']:>16,} {r['params_pct']:>7.2f} "
            f"{r['bytes']:>16,} {r['gib']:>8.3f} {r['bits_per_weight']:>7.3f}"
        )
    t, o = report["total"], report["original"]
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<12} {'':<11} {t['params']:>16,} {100:>7.2f} {t['bytes']:>16,} "
        f"{t['gib']:>8.3f} {t['bits_per_weight']:>7.3f}"
    )
    lines.append(
        f"{'original':<12} {'checkpoint':<11} {'':>16} {'':>7} {o['bytes']:>16,} "
        f"{o['gib']:>8.3f} {o['bits_per_weight']:>7.3f}"
    )
    if "budget" in report:
        b = report["budget"]
        lines.append(
            f"budget {budget_text(b)}: at most {b['max_bytes']:,} bytes ({b['max_gib']:.3f} GiB), "
            f"slack {b['slack_bytes']:,} bytes; predicted damage {b['predicted_damage']:.4g}"
        )
    return lines
