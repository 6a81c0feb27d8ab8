"""predict stage: the size of the quantized model, exactly, from the plan and the bits.

For each tier (data/plan/<tier>.json + `tiers.<tier>`): its matrices take the tier's
bits per weight (`Precision.bits_per_weight`: affine b + 32/g, mxfp4 4.25, bf16 16)
and its vectors (norms, biases, sinks) 16, whatever the tier says. Every matrix is
checked against its tier's precision first (`tierquant.core.precision.check_quantizable`:
mxfp4 for experts only, a group size that divides the input width), so a recipe and its
bits are refused here, from the headers, before anything is converted. Bytes are exact.
The original checkpoint's bytes are the sum of its tensors' sizes from the safetensors
headers. The report (tierquant.plan.size's layout) goes to `out` (DVC metrics) and the log
as a table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

from tierquant.core.checkpoint import Checkpoint
from tierquant.core.files import atomic_output, json_bytes
from tierquant.core.precision import Precision, check_quantizable, parse_tiers
from tierquant.errors import TierquantError
from tierquant.plan.allocate import check_auto_tiers
from tierquant.plan.handplan import plan_tier_names, read_allocation, read_plan
from tierquant.plan.size import GIB, format_table, size_report

log = logging.getLogger(__name__)


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


def predict(
    *, plan_dir: Path, original: Path, tiers: Mapping[str, Any], group_size: int, out: Path
) -> dict[str, Any]:
    """Write the predicted size report to `out` (JSON) and return it.

    Every tier in `tiers` needs a plan file and every plan file a `tiers` entry; a
    mismatch is an error naming the tier.
    """
    precisions = parse_tiers(tiers, group_size)
    planned = plan_tier_names(plan_dir)
    for tier in precisions:
        if tier not in planned:
            raise TierquantError(
                f"params: tiers.{tier} has no plan ({Path(plan_dir) / (tier + '.json')} is "
                f"missing): the recipe has no tier {tier!r}; the recipe's tiers are "
                f"{', '.join(planned)}"
            )
    for tier in planned:
        if tier not in precisions:
            raise TierquantError(
                f"params: recipe tier {tier!r} has no precision: add tiers.{tier} "
                f"(e.g. `+tiers.{tier}=4` on the command line)"
            )
    allocation = read_allocation(plan_dir)
    if allocation is not None:
        check_auto_tiers(precisions, group_size)
    sizes = {t: tier_size(t, read_plan(plan_dir, t), p) for t, p in precisions.items()}
    with Checkpoint(Path(original)) as ckpt:
        original_bytes = ckpt.nbytes
    report = size_report(
        {t: (precisions[t].label, n, bits / 8) for t, (n, bits) in sizes.items()},
        original_bytes,
    )
    if allocation is not None:
        total_bits = sum((bits for _, bits in sizes.values()), Fraction(0))
        report["budget"] = budget_report(allocation, total_bits)
    with atomic_output(Path(out), is_dir=False) as tmp:
        tmp.write_bytes(json_bytes(report))
    for line in format_table(report):
        log.info("%s", line)
    return report


def budget_report(allocation: dict[str, Any], total_bits: Fraction) -> dict[str, Any]:
    """recipe=auto: the budget the plan allocated to, this prediction's slack under it, and
    the plan's predicted damage (the sum of the chosen groups' measured damage)."""
    total = total_bits / 8
    if total != allocation["total_bytes"]:
        raise TierquantError(
            f"the plan's allocation totals {allocation['total_bytes']} bytes but the tiers "
            f"come to {total}; rerun the plan stage"
        )
    budget = allocation["budget"]
    slack = budget["max_bytes"] - int(total)
    return {
        **{k: v for k, v in budget.items() if k not in ("max_bytes", "min_bytes")},
        "max_bytes": budget["max_bytes"],
        "max_gib": round(budget["max_bytes"] / GIB, 3),
        "slack_bytes": slack,
        "slack_gib": round(slack / GIB, 4),
        "predicted_damage": allocation["predicted_damage"],
    }
