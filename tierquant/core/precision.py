"""Precisions: what a tier's matrices are stored at, their bits per weight, and which
tensors can take them.

`tiers:` in params maps tier name -> precision (`parse_precision`): affine bits
1, 2, 3, 4, 5, 6 or 8 with `quant.group_size` (32, 64 or 128: what `mx.quantize`
supports), `16`/`bf16` (unquantized) or `mxfp4` (the original expert bytes, kept).
Vectors (norms, biases, sinks) are always stored bf16 whatever their tier says:
`mx.quantize` only quantizes matrices, and mlx-lm only quantizes modules' weights.

`check_quantizable` is the one place that says which matrix can take which precision;
predict (from the plan's shapes), quantize and the structural check all ask it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from tierquant.core.gptoss import EXPERT_KINDS, MATRIX_KINDS
from tierquant.core.mxfp4 import GROUP_SIZE as MXFP4_GROUP
from tierquant.errors import TierquantError

AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)  # mx.quantize affine: not 7 (docs/gpt-oss-format.md)
GROUP_SIZES = (32, 64, 128)  # mx.quantize affine: not 16
TIER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
BF16_BITS = 16
TIER_BITS = (2, 3, 4, 5, 6, 8)  # the affine bits a tensor is allocated or measured at
# how affine codes are chosen: round to nearest (mx.quantize's own) or GPTQ (docs/gptq.md)
ROUNDINGS = ("rtn", "gptq")


@dataclass(frozen=True)
class Precision:
    """How a tier's matrices are stored: `affine` (bits, group_size), `bf16` or `mxfp4`."""

    mode: str  # "affine", "bf16" or "mxfp4"
    bits: int
    group_size: int | None = None

    @property
    def bits_per_weight(self) -> Fraction:
        """Stored bits per matrix weight, scales and biases included.

        affine: b bits + a bf16 scale and a bf16 bias per group of g = b + 32/g;
        mxfp4: 4 bits + one E8M0 byte per 32 = 4.25; bf16: 16.
        """
        if self.mode == "affine":
            assert self.group_size
            return self.bits + Fraction(2 * BF16_BITS, self.group_size)
        if self.mode == "mxfp4":
            return 4 + Fraction(8, MXFP4_GROUP)
        return Fraction(BF16_BITS)

    @property
    def label(self) -> str:
        """Short human form: `3-bit g64`, `bf16`, `mxfp4`."""
        if self.mode == "affine":
            return f"{self.bits}-bit g{self.group_size}"
        return self.mode

    @property
    def quantized(self) -> bool:
        return self.mode != "bf16"

    def quantization(self) -> dict[str, Any] | None:
        """mlx-lm's per-module entry for config.json's `quantization` (None: bf16)."""
        if self.mode == "affine":
            return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}
        if self.mode == "mxfp4":
            return {"group_size": MXFP4_GROUP, "bits": 4, "mode": "mxfp4"}
        return None

    def stores_quantized(self, kind: str) -> bool:
        """Whether a tensor of `kind` is stored quantized in this tier (matrices only)."""
        return self.quantized and kind in MATRIX_KINDS

    def weight_bits(self, kind: str) -> Fraction:
        """Bits per weight of a tensor of `kind` in this tier (vectors: always bf16)."""
        return self.bits_per_weight if self.stores_quantized(kind) else Fraction(BF16_BITS)


BF16 = Precision("bf16", BF16_BITS)


def check_quantizable(
    tier: str, precision: Precision, *, name: str, kind: str, shape: Sequence[int]
) -> None:
    """Refuse a precision the tensor `name` cannot take, naming the tier, its params key
    and what to do: mxfp4 applies to expert matrices only (it keeps the original's
    bytes), and the group size must divide the matrix's input width (its last axis)."""
    if not precision.stores_quantized(kind):
        return
    if precision.mode == "mxfp4" and kind not in EXPERT_KINDS:
        raise TierquantError(
            f"params: tiers.{tier}: mxfp4 keeps the original expert bytes and applies only "
            f"to {', '.join(EXPERT_KINDS)}, but tier {tier!r} holds {name!r} ({kind}); "
            "put it in another tier or pick affine bits for this one"
        )
    group = precision.group_size or MXFP4_GROUP
    if not shape or shape[-1] % group:
        raise TierquantError(
            f"params: tiers.{tier} ({precision.label}): tensor {name!r} has shape "
            f"{list(shape)}, whose input width (last dimension) is not a multiple of the "
            f"group size {group} (quant.group_size); mlx-lm would leave it unquantized. "
            "Use a group size that divides it or put it in an unquantized tier."
        )


def check_group_size(group_size: object, key: str = "quant.group_size") -> int:
    """A group size mx.quantize's affine mode supports, or an error naming `key`."""
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise TierquantError(
            f"params: {key} must be one of {', '.join(map(str, GROUP_SIZES))} "
            f"(what mx.quantize supports), got {group_size!r}"
        )
    return int(group_size)  # type: ignore[call-overload]


def parse_precision(value: object, key: str, group_size: int = 64) -> Precision:
    """Parse a `tiers.<name>` value: int bits, `16`/`bf16`, or `mxfp4`; errors name `key`."""
    text = value.strip().lower() if isinstance(value, str) else value
    if isinstance(text, str) and text.isdigit():
        text = int(text)
    if isinstance(text, int) and not isinstance(text, bool):
        if text == BF16_BITS:
            return BF16
        if text in AFFINE_BITS:
            return Precision("affine", text, check_group_size(group_size))
    elif text in ("bf16", "mxfp4"):
        return BF16 if text == "bf16" else Precision("mxfp4", 4, MXFP4_GROUP)
    raise TierquantError(
        f"params: {key}: {value!r} is not a supported precision; use affine bits "
        f"{', '.join(map(str, AFFINE_BITS))} (not 7: mx.quantize has no 7-bit mode), "
        "16 or bf16 (unquantized), or mxfp4 (original expert bytes)"
    )


def parse_tiers(tiers: Mapping[str, object], group_size: int) -> dict[str, Precision]:
    """Every `tiers.<name>` parsed, in order; the first bad one raises, naming its key."""
    check_group_size(group_size)
    out: dict[str, Precision] = {}
    for name, value in tiers.items():
        check_tier_name(str(name), f"tiers.{name}")
        out[str(name)] = parse_precision(value, f"tiers.{name}", group_size)
    return out


def check_tier_name(name: str, key: str) -> None:
    """Tier names become file names (data/plan/<tier>.json) and DVC stage names."""
    if not TIER_NAME.fullmatch(name):
        raise TierquantError(
            f"params: {key}: tier name {name!r} must be letters, digits, '_' or '-'"
        )


def parse_candidates(
    candidates: Sequence[object], group_size: int, key: str = "measure.candidates"
) -> list[Precision]:
    """Candidate precisions (`key`, e.g. measure.candidates) → Precisions: affine bits
    TIER_BITS at `group_size`, mxfp4, bf16; each once."""
    out: list[Precision] = []
    for i, c in enumerate(candidates):
        p = parse_precision(c, f"{key}[{i}]", group_size)
        if p.mode == "affine" and p.bits not in TIER_BITS:
            raise TierquantError(
                f"params: {key}[{i}]: {c!r}; affine candidates are {', '.join(map(str, TIER_BITS))}"
            )
        if p in out:
            raise TierquantError(f"params: {key}[{i}]: {c!r} is listed twice")
        out.append(p)
    if not out:
        raise TierquantError(f"params: {key} is empty")
    return out
