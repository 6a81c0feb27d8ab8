"""The plan files: `data/plan/<tier>.json` for every tier of the recipe, canonical JSON
holding the tier's tensors (name, mlx-lm module path, kind, layer, shape, numel) sorted
by name, and the sorted module paths of its matrices; recipe=auto adds its allocation
report (ALLOCATION). No bits: changing `tiers.<tier>` never changes a plan file, so
only what depends on the bits reruns. Written by the plan stage, read by predict,
quantize, validate's structure check and the card.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tierquant.core.files import atomic_output, json_bytes, read_json
from tierquant.core.gptoss import Weight
from tierquant.errors import TierquantError

log = logging.getLogger(__name__)

ALLOCATION = "auto/allocation.json"  # recipe=auto's allocation report, in the plan dir

PLAN_FORMAT = 1


def tier_plan(tier: str, weights: list[Weight]) -> dict[str, Any]:
    """The content of `<tier>.json`: the tier's tensors, sorted by name."""
    tensors = [
        {
            "name": w.name,
            "module": w.module,
            "kind": w.kind,
            "layer": w.layer,
            "shape": list(w.shape),
            "numel": w.numel,
        }
        for w in sorted(weights, key=lambda w: w.name)
    ]
    return {
        "format": PLAN_FORMAT,
        "tier": tier,
        "count": len(tensors),
        "numel": sum(t["numel"] for t in tensors),
        "modules": sorted({w.module for w in weights if w.is_matrix}),
        "tensors": tensors,
    }


def write_plan(
    out: Path, tiers: dict[str, list[Weight]], extra: dict[str, bytes] | None = None
) -> None:
    """`out/<tier>.json` per tier (+ `extra` files by relative path), atomically."""
    with atomic_output(Path(out)) as tmp:
        for tier, weights in tiers.items():
            (tmp / f"{tier}.json").write_bytes(json_bytes(tier_plan(tier, weights)))
        for rel, data in (extra or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)


def log_plan(tiers: dict[str, list[Weight]]) -> None:
    total = sum(w.numel for ws in tiers.values() for w in ws)
    for tier, weights in tiers.items():
        numel = sum(w.numel for w in weights)
        log.info(
            "plan %-12s %5d tensors %15d params (%6.2f%%)",
            tier,
            len(weights),
            numel,
            100 * numel / total,
        )


def read_allocation(plan_dir: Path) -> dict[str, Any] | None:
    """The allocation report of a recipe=auto plan, or None for a hand recipe's plan."""
    path = Path(plan_dir) / ALLOCATION
    return read_json(path) if path.is_file() else None


def read_plan(plan_dir: Path, tier: str) -> dict[str, Any]:
    """Load `plan_dir/<tier>.json` (as written by `plan`), checking its shape."""
    path = Path(plan_dir) / f"{tier}.json"
    if not path.is_file():
        raise TierquantError(
            f"{path}: no plan for tier {tier!r}: the recipe has no such tier (is "
            f"tiers.{tier} a leftover from another recipe?) or the plan stage has not run"
        )
    data = read_json(path)
    if (
        not isinstance(data, dict)
        or data.get("format") != PLAN_FORMAT
        or data.get("tier") != tier
        or not isinstance(data.get("tensors"), list)
    ):
        raise TierquantError(f"{path}: not a tier plan for {tier!r}; rerun the plan stage")
    return data


def plan_tier_names(plan_dir: Path) -> list[str]:
    """The tiers that have a plan file in `plan_dir` (skipping DVC's .gitignore etc.)."""
    plan_dir = Path(plan_dir)
    if not plan_dir.is_dir():
        raise TierquantError(f"{plan_dir}: plan directory is missing; run the plan stage")
    return sorted(p.stem for p in plan_dir.glob("*.json") if not p.name.startswith("."))


def check_tiers_match_plan(plan_dir: Path, tiers: Iterable[str]) -> None:
    """Every tier in `tiers` (the `tiers` params) has a plan file and every plan file a
    `tiers` entry; a mismatch is an error naming the tier and what to do."""
    planned = plan_tier_names(plan_dir)
    tiers = list(tiers)
    for tier in tiers:
        if tier not in planned:
            raise TierquantError(
                f"params: tiers.{tier} has no plan ({Path(plan_dir) / (tier + '.json')} is "
                f"missing): the recipe has no tier {tier!r}; the recipe's tiers are "
                f"{', '.join(planned)}"
            )
    for tier in planned:
        if tier not in tiers:
            raise TierquantError(
                f"params: recipe tier {tier!r} has no precision: add tiers.{tier} "
                f"(e.g. `+tiers.{tier}=4` on the command line)"
            )
