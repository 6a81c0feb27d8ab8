"""The plan of recipe=auto: each allocation group at the precision the allocator picks
from the measured damage (data/measure) and the budget, written as tiers keyed by
precision (`bf16`, `q2` … `q8`, `mxfp4`: tierquant.plan.allocate.AUTO_TIERS; empty ones too).

Why tiers keyed by precision: dvc.yaml runs one quantize stage per tier, and a tier's
stage reruns only when its plan file (its tensor list) or its precision changes. Keyed
by precision, a budget change moves a few groups between neighbouring precisions, so
only those precisions' stages rerun, and a tier whose membership did not change (at
120B: typically most of them) stays cached; its precision never changes with the budget.

`data/plan/auto/allocation.json` records the budget, every group's precision, bytes and
predicted damage, the totals and the slack; predict reports it beside the size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tierquant.core.files import json_bytes, read_json
from tierquant.core.gptoss import GptOssShape, Weight, verify_original
from tierquant.core.precision import BF16, Precision, parse_precision
from tierquant.errors import TierquantError
from tierquant.plan.allocate import allocate
from tierquant.plan.autotiers import AUTO_TIERS, router_precision, tier_name
from tierquant.plan.budget import BudgetRequest, resolve_budget
from tierquant.plan.budgettext import budget_text
from tierquant.plan.footprint import MemoryModel
from tierquant.plan.planfile import ALLOCATION, log_plan, write_plan
from tierquant.quality.damage import Group, allocation_groups, read_damage

log = logging.getLogger(__name__)


def auto_tiers(
    groups: list[Group], fixed: list[Weight], chosen: dict[str, Precision], router: Precision
) -> dict[str, list[Weight]]:
    """Tier (AUTO_TIERS, all present) → its weights."""
    tiers: dict[str, list[Weight]] = {t: [] for t in AUTO_TIERS}
    for w in fixed:
        tiers[tier_name(router) if w.kind == "router" else "bf16"].append(w)
    for g in groups:
        tiers[tier_name(chosen[g.name])].extend(g.weights)
    return tiers


def fixed_and_total(groups: list[Group], fixed: list[Weight], router: Precision) -> tuple[int, int]:
    """(bytes of the weights outside every group: bf16, the router at `router`; the
    model's parameter count): what a budget is resolved and allocated against."""
    fixed_bits = sum(
        w.numel * (router if w.kind == "router" else BF16).weight_bits(w.kind) for w in fixed
    )
    total_params = sum(w.numel for w in fixed) + sum(w.numel for g in groups for w in g.weights)
    return int(fixed_bits / 8), total_params


def auto_plan(
    *,
    original: Path,
    measure_dir: Path,
    budget: BudgetRequest,
    memory: MemoryModel,
    group_size: int,
    out: Path,
) -> dict[str, Any]:
    """Allocate and write the plan (`out/<tier>.json` + ALLOCATION); return the report."""
    original = Path(original)
    verify_original(original).close()
    config = read_json(original / "config.json")
    shape = GptOssShape.from_config(config)
    groups, fixed = allocation_groups(shape)
    measured = read_damage(Path(measure_dir))
    if measured["group_size"] != group_size:
        raise TierquantError(
            f"{measure_dir}: damage measured at group size {measured['group_size']}, but "
            f"quant.group_size is {group_size}; rerun the measure stage (`dvc repro measure`)"
        )
    candidates = [
        parse_precision(c, "measure.candidates", group_size) for c in measured["candidates"]
    ]
    router = router_precision(budget.router, group_size)
    fixed_bytes, total_params = fixed_and_total(groups, fixed, router)
    b = resolve_budget(
        budget,
        shape=shape,
        total_params=total_params,
        max_positions=int(config.get("max_position_embeddings", 0) or 0),
        memory=memory,
    )
    damage = {name: entry["damage"] for name, entry in measured["groups"].items()}
    alloc = allocate(
        groups,
        damage,
        candidates,
        max_bytes=b.max_bytes - fixed_bytes,
        min_bytes=None if b.min_bytes is None else b.min_bytes - fixed_bytes,
    )
    tiers = auto_tiers(groups, fixed, alloc.precision, router)
    total_bytes = fixed_bytes + alloc.nbytes
    report = {
        "format": 1,
        "budget": {**b.spec, "max_bytes": b.max_bytes, "min_bytes": b.min_bytes},
        "total_bytes": total_bytes,
        "slack_bytes": b.max_bytes - total_bytes,
        "bits_per_weight": round(total_bytes * 8 / total_params, 6),
        "predicted_damage": alloc_damage(alloc.damage),
        "damage_measure": measured.get("measure"),
        "fixed": {"bytes": fixed_bytes, "router": router.label},
        "resolution_bytes": alloc.resolution,
        "optimality_gap_bytes": len(groups) * (alloc.resolution - 1),
        "groups": {
            g.name: {
                "precision": alloc.precision[g.name].label,
                "tier": tier_name(alloc.precision[g.name]),
                "bytes": g.nbytes(alloc.precision[g.name]),
                "damage": alloc.damage[g.name],
            }
            for g in groups
        },
    }
    write_plan(Path(out), tiers, {ALLOCATION: json_bytes(report)})
    log_plan(tiers)
    for name, row in report["groups"].items():
        log.info(
            "%-28s %-11s %12d B  damage %.4g", name, row["precision"], row["bytes"], row["damage"]
        )
    log.info(
        "wrote %s: recipe auto, budget %s, %d bytes (%.4f bits/weight), slack %d bytes, "
        "predicted damage %.4g",
        out,
        budget_text(b.spec),
        total_bytes,
        report["bits_per_weight"],
        report["slack_bytes"],
        report["predicted_damage"],
    )
    return report


def alloc_damage(damage: dict[str, float]) -> float:
    return float(sum(damage.values()))
