"""The allocation groups and their measured damage (data/measure/damage.json).

Allocation groups (`allocation_groups`): per decoder layer `attn_qk` (q_proj, k_proj),
`attn_vo` (v_proj, o_proj), `experts_gate_up` (gate_proj, up_proj), `experts_down`
(down_proj); plus `embed_tokens` and `lm_head`. Everything else (norms, biases, sinks,
the router) is outside every group. measure writes each group's damage at each
candidate precision (format MEASURE_FORMAT); recipe=auto's plan reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from tierquant.core.files import read_json
from tierquant.core.gptoss import EXPERT_KINDS, GptOssShape, Weight, mlx_weights
from tierquant.core.precision import Precision
from tierquant.errors import TierquantError

LAYER_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_qk": ("q_proj", "k_proj"),
    "attn_vo": ("v_proj", "o_proj"),
    "experts_gate_up": ("gate_proj", "up_proj"),
    "experts_down": ("down_proj",),
}
GLOBAL_GROUPS = ("embed_tokens", "lm_head")
MEASURE_FORMAT = 1
DAMAGE = "damage.json"  # inside data/measure


def read_damage(measure_dir: Path) -> dict[str, Any]:
    """data/measure/damage.json, checked."""
    path = Path(measure_dir) / DAMAGE
    if not path.is_file():
        raise TierquantError(f"{path}: missing; run the measure stage (`dvc repro measure`)")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != MEASURE_FORMAT:
        raise TierquantError(f"{path}: not a damage table; rerun the measure stage")
    return data


@dataclass(frozen=True)
class Group:
    """One allocation group: `name` is `layers.<i>.<kind>` or `embed_tokens`/`lm_head`."""

    name: str
    kind: str  # attn_qk, attn_vo, experts_gate_up, experts_down, embed_tokens, lm_head
    layer: int | None
    weights: tuple[Weight, ...]

    @property
    def is_experts(self) -> bool:
        return all(w.kind in EXPERT_KINDS for w in self.weights)

    def allows(self, precision: Precision) -> bool:
        """mxfp4 keeps the original's expert bytes: expert groups only."""
        return precision.mode != "mxfp4" or self.is_experts

    def bits(self, precision: Precision) -> Fraction:
        """Stored bits of the group's matrices at `precision` (predict's formula)."""
        return sum((w.numel * precision.weight_bits(w.kind) for w in self.weights), Fraction(0))

    def nbytes(self, precision: Precision) -> int:
        b = self.bits(precision) / 8
        if b.denominator != 1:
            raise TierquantError(f"group {self.name}: {precision.label} is not whole bytes")
        return int(b)


def allocation_groups(shape: GptOssShape) -> tuple[list[Group], list[Weight]]:
    """(groups in checkpoint order, the weights outside every group: vectors, router)."""
    weights = mlx_weights(shape)
    by_kind = {k: g for g, kinds in LAYER_GROUPS.items() for k in kinds}
    members: dict[str, list[Weight]] = {}
    info: dict[str, tuple[str, int | None]] = {}
    fixed: list[Weight] = []
    for w in weights:
        if w.kind in GLOBAL_GROUPS:
            key, kind, layer = w.kind, w.kind, None
        elif w.kind in by_kind:
            kind, layer = by_kind[w.kind], w.layer
            key = f"layers.{layer}.{kind}"
        else:
            fixed.append(w)
            continue
        members.setdefault(key, []).append(w)
        info[key] = (kind, layer)
    groups = [Group(k, info[k][0], info[k][1], tuple(ws)) for k, ws in members.items()]
    return groups, fixed
