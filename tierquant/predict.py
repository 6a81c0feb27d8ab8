"""predict stage: the size of the quantized model, exactly, from the plan and the bits.

For each tier (data/plan/<tier>.json + `tiers.<tier>`): its matrices take the tier's
bits per weight (`Precision.bits_per_weight`: affine b + 32/g, mxfp4 4.25, bf16 16)
and its vectors (norms, biases, sinks) 16, whatever the tier says. Bytes are exact
(integers: every quantized matrix's numel is a multiple of its group size, which is
checked). The original checkpoint's bytes are the sum of its tensors' sizes from the
safetensors headers. The report goes to `<out>` (DVC metrics) and the log as a table.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, atomic_output, json_bytes
from .errors import TierquantError
from .plan import plan_tier_names, read_plan
from .recipe import Precision, check_tier_precision, parse_tiers

log = logging.getLogger(__name__)

GIB = 1 << 30


def tier_size(tier: str, plan: dict[str, Any], precision: Precision) -> tuple[int, Fraction]:
    """(numel, exact bits) of one tier's tensors at `precision`."""
    kinds = {t["kind"] for t in plan["tensors"]}
    check_tier_precision(tier, precision, kinds)
    numel, bits = 0, Fraction(0)
    for t in plan["tensors"]:
        n = int(t["numel"])
        per_weight = precision.weight_bits(t["kind"])
        if per_weight != 16:
            group = precision.group_size or 1
            if not t["shape"] or t["shape"][-1] % group:
                raise TierquantError(
                    f"params: tiers.{tier} ({precision.label}): tensor {t['name']!r} has "
                    f"shape {t['shape']}, whose last dimension is not a multiple of the group "
                    f"size {group} (quant.group_size); mlx-lm would leave it unquantized. "
                    "Use another group size or put it in an unquantized tier."
                )
        numel += n
        bits += n * per_weight
    return numel, bits


def predict(
    *, plan_dir: Path, original: Path, tiers: dict[str, Any], group_size: int, out: Path
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
    sizes = {t: tier_size(t, read_plan(plan_dir, t), p) for t, p in precisions.items()}
    total_numel = sum(n for n, _ in sizes.values())
    total_bits = sum((b for _, b in sizes.values()), Fraction(0))
    with Checkpoint(Path(original)) as ckpt:
        original_bytes = sum(t.nbytes for t in ckpt.tensors.values())

    report: dict[str, Any] = {
        "total": _size(total_numel, total_bits, total_numel),
        "original": {
            "bytes": original_bytes,
            "GiB": round(original_bytes / GIB, 3),
            "GB": round(original_bytes / 1e9, 3),
            "bits_per_weight": round(original_bytes * 8 / total_numel, 6),
        },
        "ratio_to_original": round(float(total_bits / 8 / original_bytes), 6),
        "tiers": {
            tier: {"precision": precisions[tier].label, **_size(n, b, total_numel)}
            for tier, (n, b) in sizes.items()
        },
    }
    with atomic_output(Path(out), is_dir=False) as tmp:
        tmp.write_bytes(json_bytes(report))
    for line in format_table(report):
        log.info("%s", line)
    return report


def _size(numel: int, bits: Fraction, total_numel: int) -> dict[str, Any]:
    nbytes = bits / 8
    return {
        "params": numel,
        "percent_params": round(100 * numel / total_numel, 4),
        "bytes": int(nbytes) if nbytes.denominator == 1 else float(nbytes),
        "GiB": round(float(nbytes) / GIB, 3),
        "bits_per_weight": round(float(bits / numel), 6),
    }


def format_table(report: dict[str, Any]) -> list[str]:
    """The report as a fixed-width table, one string per line."""
    head = (
        f"{'tier':<12} {'precision':<11} {'params':>16} {'%':>7} {'bytes':>16} "
        f"{'GiB':>8} {'bpw':>7}"
    )
    lines = [head, "-" * len(head)]
    for tier, r in report["tiers"].items():
        lines.append(
            f"{tier:<12} {r['precision']:<11} {r['params']:>16,} {r['percent_params']:>7.2f} "
            f"{r['bytes']:>16,} {r['GiB']:>8.3f} {r['bits_per_weight']:>7.3f}"
        )
    t, o = report["total"], report["original"]
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<12} {'':<11} {t['params']:>16,} {100:>7.2f} {t['bytes']:>16,} "
        f"{t['GiB']:>8.3f} {t['bits_per_weight']:>7.3f}"
    )
    lines.append(
        f"{'original':<12} {'checkpoint':<11} {'':>16} {'':>7} {o['bytes']:>16,} "
        f"{o['GiB']:>8.3f} {o['bits_per_weight']:>7.3f}"
    )
    return lines
