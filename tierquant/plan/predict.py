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
from tierquant.core.precision import parse_tiers
from tierquant.errors import TierquantError
from tierquant.plan.autotiers import check_auto_tiers
from tierquant.plan.planfile import check_tiers_match_plan, read_allocation, read_plan
from tierquant.plan.size import GIB, format_table, size_report, tier_size

log = logging.getLogger(__name__)


def predict(
    *, plan_dir: Path, original: Path, tiers: Mapping[str, Any], group_size: int, out: Path
) -> dict[str, Any]:
    """Write the predicted size report to `out` (JSON) and return it.

    Every tier in `tiers` needs a plan file and every plan file a `tiers` entry; a
    mismatch is an error naming the tier.
    """
    precisions = parse_tiers(tiers, group_size)
    check_tiers_match_plan(plan_dir, precisions)
    allocation = read_allocation(plan_dir)
    if allocation is not None:
        check_auto_tiers(precisions)
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
