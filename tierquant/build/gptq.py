"""quantize@<tier> with `quant.rounding: gptq`: the tier's affine attention and expert
matrices rounded by GPTQ (tierquant.core.gptq) into exactly the bytes' layout
mx.quantize gives (same tensors, shapes, dtypes and sizes as round-to-nearest), every
other tensor as tierquant.build.quantize writes it.

- Which matrices: q/k/v/o_proj, each expert's gate/up/down_proj and lm_head, at an
  affine precision. embed_tokens stays round-to-nearest (its input is one-hot: its
  Hessian is diagonal, where GPTQ is RTN). mxfp4 and bf16 tiers are unchanged.
- lm_head (201088 × 2880 at gpt-oss) is rounded in chunks of HEAD_ROWS rows (the rule:
  tierquant.quality.hessian.gptq_rounded, which measure's gptq scoring shares) sharing one
  factor of its Hessian (rows are independent given H), so its working set is a chunk's,
  not the whole head's in float32 (2.3 GB).
- Hessians: recomputed here, for this tier's layers only, from the ORIGINAL model's
  inputs on the calibration windows (tierquant.quality.hessian: the streamed forward,
  one layer resident), never stored: a tier's bytes depend on the original, its plan,
  its precision and the calibration windows, not on any other tier (docs/gptq.md has
  the cost, and why nothing is stored).
- An expert with few routed tokens: a blend with the layer's pooled Hessian
  (tierquant.quality.hessian.LayerInputs.hessian).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tierquant.build.manifest import ERROR_ROW_STRIDE
from tierquant.build.quantize import quantize
from tierquant.core.checkpoint import Checkpoint, ShardedWriter
from tierquant.core.gptoss import EXPERT_KINDS, Weight
from tierquant.core.gptq import dequantize
from tierquant.core.precision import Precision
from tierquant.quality.hessian import DAMP, HeadInputs, LayerInputs, gptq_rounded
from tierquant.quality.windows import read_windows

GPTQ_KINDS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
)


class GptqRounder:
    """The `tierquant.build.quantize.Rounder` for GPTQ: the matrices are handed over layer
    by layer, as the streamed forward of the original over `tokens` reaches each."""

    method = "gptq"

    def __init__(self, original_dir: Path, tokens: np.ndarray, batch_size: int) -> None:
        self.original_dir = Path(original_dir)
        self.tokens = tokens
        self.batch_size = batch_size
        self.inputs: LayerInputs | HeadInputs | None = None
        self.stream: Iterator[LayerInputs | HeadInputs] = iter(())

    def takes(self, weight: Weight, precision: Precision) -> bool:
        return (
            weight.kind in GPTQ_KINDS
            and precision.mode == "affine"
            and precision.stores_quantized(weight.kind)
        )

    def order(self, weights: list[Weight]) -> Iterator[Weight]:
        layers = {w.layer for w in weights if w.layer is not None}
        head = any(w.kind == "lm_head" for w in weights)
        self.stream = LayerInputs.stream(
            self.original_dir, self.tokens, batch_size=self.batch_size, layers=layers, head=head
        )
        # the stream's order: layers, then the head (after the last layer)
        yield from sorted(weights, key=lambda w: w.layer if w.layer is not None else math.inf)
        self.inputs = None
        self.stream = iter(())

    def write(
        self,
        original: Checkpoint,
        writer: ShardedWriter,
        weight: Weight,
        precision: Precision,
        bar: tqdm,
    ) -> float:
        while self.inputs is None or self.inputs.layer != weight.layer:
            self.inputs = next(self.stream)
        return write_gptq(original, self.inputs, writer, weight, precision, bar)

    def manifest(self) -> dict:
        return {
            "method": self.method,
            "damp": DAMP,
            "calibration_windows": int(self.tokens.shape[0]),
            "calibration_tokens": int(self.tokens.size),
        }


def write_gptq(
    original: Checkpoint,
    inputs: LayerInputs | HeadInputs,
    writer: ShardedWriter,
    w: Weight,
    precision: Precision,
    bar: tqdm,
) -> float:
    """GPTQ of `w` (a matrix, lm_head by HEAD_ROWS rows, or each expert of an
    [E, out, in] stack, one at a time) against its inputs' Hessian into `writer`; return
    the relative RMSE of the sampled rows (every ERROR_ROW_STRIDE-th row of each
    expert), as round-to-nearest records it."""
    g, bits = precision.group_size, precision.bits
    err_sq = ref_sq = 0.0
    lead = (1,) if w.kind in EXPERT_KINDS else ()
    for weight, (packed, scales, biases) in gptq_rounded(original, inputs, w, precision):
        rows = slice(None, None, ERROR_ROW_STRIDE)  # HEAD_ROWS is a multiple of the stride
        w_hat = dequantize(packed[rows], scales[rows], biases[rows], bits=bits, group_size=g)
        ref = weight[rows].astype(np.float64)
        err_sq += float(np.sum((w_hat - ref) ** 2))
        ref_sq += float(np.sum(ref * ref))
        writer.write(f"{w.module}.weight", packed.reshape(*lead, *packed.shape))
        writer.write(f"{w.module}.scales", scales.reshape(*lead, *scales.shape))
        writer.write(f"{w.module}.biases", biases.reshape(*lead, *biases.shape))
        bar.update(weight.size * 2)
    return math.sqrt(err_sq / ref_sq) if ref_sq else 0.0


def quantize_gptq(
    *,
    tier: str,
    tiers: dict[str, Precision],
    plan_dir: Path,
    original_dir: Path,
    out_dir: Path,
    max_shard_bytes: int,
    calibration: Path,
    batch_size: int,
) -> dict:
    """The quantize_gptq@<tier> stage: tierquant.build.quantize.quantize with the tier's
    affine matrices rounded by GPTQ on the calibration windows file `calibration`
    (tierquant.quality.windows), the forward run `batch_size` windows at a time."""
    return quantize(
        tier=tier,
        tiers=tiers,
        plan_dir=plan_dir,
        original_dir=original_dir,
        out_dir=out_dir,
        max_shard_bytes=max_shard_bytes,
        rounder=GptqRounder(original_dir, read_windows(Path(calibration)), batch_size),
    )
