"""The float rows of the original: each tensor of the bf16 float checkpoint (mlx-lm
names) as it is made from the original MXFP4 checkpoint, read without writing that
checkpoint. The one place for the expert layout rule: gate_up_proj interleaves gate and
up rows (gate the even ones, up the odd), for the matrix and its bias alike, and
down_proj is renamed. convert, quantize, measure and validate's integrity check all
read through here.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tierquant.core.checkpoint import Checkpoint
from tierquant.core.gptoss import EXPERT_KINDS, Weight
from tierquant.core.mxfp4 import dequantize_to_bf16_bits
from tierquant.errors import TierquantError


def _expert_source(layer: int | None, projection: str, name: str) -> tuple[str, slice]:
    """The original's tensor prefix an expert projection lives in and the rows of it that
    are its own: gate_up_proj interleaves gate and up rows (gate the even ones, up the
    odd), for the matrix and its bias alike."""
    prefix = f"model.layers.{layer}.mlp.experts"
    if projection == "down_proj":
        return f"{prefix}.down_proj", slice(None)
    if projection not in ("gate_proj", "up_proj"):
        raise TierquantError(f"{name}: not an expert tensor (no source in the original)")
    return f"{prefix}.gate_up_proj", slice(projection == "up_proj", None, 2)


def mxfp4_source(weight: Weight) -> tuple[str, str, slice]:
    """Where an expert matrix (mlx-lm's gate_proj/up_proj/down_proj) lives in the original:
    its `_blocks` and `_scales` tensors and the rows of them that are its own."""
    prefix, rows = _expert_source(weight.layer, weight.kind, weight.name)
    return f"{prefix}_blocks", f"{prefix}_scales", rows


def _float_source(original: Checkpoint, weight: Weight) -> tuple[str, str, slice]:
    """How the float checkpoint's `weight` is made from the original, the one rule both
    readers below follow: ("mxfp4", "", rows) for an expert matrix (decoded; see
    mxfp4_source), ("copy", name, :) for a tensor stored under the same name, ("columns",
    bias, cols) for an expert bias (columns of gate_up_proj_bias, interleaved like the
    rows)."""
    if weight.kind in EXPERT_KINDS:
        return "mxfp4", "", mxfp4_source(weight)[2]
    if weight.name in original:
        return "copy", weight.name, slice(None)
    if ".mlp.experts." in weight.name:
        prefix, cols = _expert_source(weight.layer, weight.name.split(".")[-2], weight.name)
        return "columns", f"{prefix}_bias", cols
    raise TierquantError(
        f"{weight.name}: not in the original checkpoint; re-download it (download)"
    )


def iter_float_rows(original: Checkpoint, weight: Weight) -> Iterator[np.ndarray]:
    """Tensor `weight` of the float checkpoint exactly as convert writes it (raw: bf16 as
    uint16), in consecutive slices along its first axis, read from the `original`: an
    expert matrix decoded from MXFP4 one expert at a time, an expert bias split out of
    gate_up_proj_bias, anything else copied (same name, same bytes)."""
    how, name, part = _float_source(original, weight)
    if how == "mxfp4":
        for e in range(weight.shape[0]):
            yield read_expert_bf16(original, weight, e, e + 1)
    elif how == "copy":
        yield from original.iter_rows(name)
    else:
        yield original.read(name)[:, part]


def float_row_sample(original: Checkpoint, weight: Weight, start: int, step: int) -> np.ndarray:
    """Rows start, start+step, ... of tensor `weight` of the float checkpoint, raw, in
    `Checkpoint.read_row_sample`'s layout, read from the `original` by the same rule:
    an expert matrix's rows decoded from the MXFP4 rows that hold them (a quarter of the
    bytes), an expert bias's experts split out of gate_up_proj_bias."""
    how, name, part = _float_source(original, weight)
    if how == "mxfp4":
        blocks_name, scales_name, _ = mxfp4_source(weight)
        first, stride = part.start or 0, part.step or 1
        row, every = first + start * stride, step * stride
        scales = original.read_row_sample(scales_name, row, every)
        blocks = original.read_row_sample(blocks_name, row, every).reshape(*scales.shape, -1)
        return dequantize_to_bf16_bits(blocks, scales, name=f"{scales_name} ({weight.name})")
    rows = original.read_row_sample(name, start, step)
    return rows if how == "copy" else rows[..., part]


def read_expert_bf16(
    original: Checkpoint, weight: Weight, start: int, stop: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Experts [start, stop) of an expert matrix exactly as the float checkpoint holds them
    (bf16 bits, uint16 [stop - start, out, in]; into `out` if given), decoded from the
    `original`'s MXFP4 by convert's own decoder: the same bits from a quarter of the bytes."""
    blocks_name, scales_name, own = mxfp4_source(weight)
    blocks = original.read_rows(blocks_name, start, stop)[:, own]
    scales = original.read_rows(scales_name, start, stop)[:, own]
    where = f"{scales_name} (experts {start}..{stop - 1} of {weight.name})"
    return dequantize_to_bf16_bits(blocks, scales, out=out, name=where)
