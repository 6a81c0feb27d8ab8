"""recipe=auto's tiers, keyed by precision: every allocated tensor goes to the tier of
its precision (bf16, q2 … q8, mxfp4), so a budget change moves tensors between tiers
and reruns only the tiers whose membership changed."""

from __future__ import annotations

from tierquant.core.precision import BF16, TIER_BITS, Precision, parse_precision
from tierquant.errors import TierquantError


def tier_name(precision: Precision) -> str:
    """The recipe=auto tier a precision's tensors go to: bf16, q2 … q8, mxfp4."""
    if precision.mode == "affine":
        return f"q{precision.bits}"
    return precision.mode


AUTO_TIERS = ("bf16", *(f"q{b}" for b in TIER_BITS), "mxfp4")


def check_auto_tiers(precisions: dict[str, Precision]) -> None:
    """recipe=auto's `tiers:` must be exactly AUTO_TIERS, each at its own precision."""
    if set(precisions) != set(AUTO_TIERS):
        raise TierquantError(
            f"params: recipe=auto needs tiers {', '.join(AUTO_TIERS)} (tiers keyed by "
            f"precision), got {', '.join(precisions)}; recompose with `-S recipe=auto`"
        )
    for name, p in precisions.items():
        if tier_name(p) != name:
            raise TierquantError(
                f"params: tiers.{name} is {p.label}, but recipe=auto's tier {name!r} holds "
                f"the tensors allocated {name}; change the budget, not the tier"
            )


def router_precision(value: object, group_size: int) -> Precision:
    """`budget.router`: bf16, or 8-bit affine (gpt-oss's own choice in mlx-lm)."""
    p = parse_precision(value, "budget.router", group_size)
    if p not in (BF16, parse_precision(8, "budget.router", group_size)):
        raise TierquantError(f"params: budget.router must be bf16 or 8, got {value!r}")
    return p
