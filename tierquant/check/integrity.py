"""Integrity of every tensor of an assembled model against its source, sampled rows.

Independent of how sensitive the model is to a damaged tensor: each module of each
tier (the tier's manifest, `data/quantized/<tier>/manifest.json`, lists them) is checked
on every `ERROR_ROW_STRIDE`-th row (of every expert, for [E, out, in] stacks), the rows
the quantize stage measured its error on:

- affine-quantized: the model's rows are dequantized (`mx.dequantize` at the tier's bits
  and group size) and compared with the same rows of the float checkpoint, read from the
  original as the quantize stage reads them (`floatrows.float_row_sample`: expert rows
  decoded from the MXFP4 rows that hold them, a quarter of the bytes). The relative
  RMSE of each expert (or of the whole matrix) must be at most `ERROR_FACTOR` × the error
  the quantize stage recorded for the module at write time (plus `ERROR_FLOOR`). A
  tensor swapped with another of the same shape, a zeroed expert, or a module quantized
  at fewer bits than its tier and stored in the tier's format all exceed it.
- mxfp4 (the original's expert bytes repacked): the rows' bytes equal the original's.
- bf16 (matrices left unquantized, norms, biases, router, sinks): the rows' bytes equal
  the float checkpoint's (from the original, as above).

Reads about 1/16 of the model and of the original (one row at a time, one tensor at a
time), never a whole checkpoint, and never the float checkpoint: the original is what
every stage before validate has just read, so it is in the page cache where the float
checkpoint (4x its expert bytes at gpt-oss-120b) no longer is.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from tierquant.build.manifest import ERROR_ROW_STRIDE, read_manifest
from tierquant.core.checkpoint import Checkpoint
from tierquant.core.floatrows import float_row_sample, mxfp4_source
from tierquant.core.gptoss import Weight, mlx_weights, shape_of_checkpoint
from tierquant.core.precision import Precision
from tierquant.errors import TierquantError

log = logging.getLogger(__name__)

ERROR_FACTOR = 2.0
ERROR_FLOOR = 1e-3
PARTS = ("weight", "scales", "biases")  # an affine-quantized module's tensors


class FloatRows:
    """The float checkpoint's sampled rows of any tensor, read from the original."""

    def __init__(self, original: Checkpoint) -> None:
        self.original = original
        self.weights = {w.name: w for w in mlx_weights(shape_of_checkpoint(original.root))}

    def __call__(self, name: str) -> np.ndarray:
        weight = self.weights.get(name)
        if weight is None:
            raise TierquantError(f"{name}: not a tensor of gpt-oss (no source in the original)")
        return float_row_sample(self.original, weight, 0, ERROR_ROW_STRIDE)


def _rows(ckpt: Checkpoint, name: str) -> np.ndarray:
    return ckpt.read_row_sample(name, 0, ERROR_ROW_STRIDE)


def _affine_errors(
    model: Checkpoint, source: FloatRows, module: str, bits: int, group_size: int
) -> np.ndarray:
    """Relative RMSE of the model's dequantized sampled rows against the float ones, per
    leading slice (expert) — one value for a 2-D matrix."""
    import mlx.core as mx

    w, scales, biases = (mx.array(_rows(model, f"{module}.{part}")) for part in PARTS)
    ref = mx.array(source(f"{module}.weight")).view(mx.bfloat16).astype(mx.float32)
    dq = mx.dequantize(
        w,
        scales.view(mx.bfloat16),
        biases.view(mx.bfloat16),
        group_size=group_size,
        bits=bits,
    ).astype(mx.float32)
    if dq.shape != ref.shape:
        raise ValueError(f"dequantizes to {tuple(dq.shape)}, its source is {tuple(ref.shape)}")
    diff = dq - ref
    err = mx.sum(diff * diff, axis=(-2, -1))
    norm = mx.sum(ref * ref, axis=(-2, -1))
    mx.eval(err, norm)
    err, norm = np.array(err, dtype=np.float64), np.array(norm, dtype=np.float64)
    return np.where(norm > 0, np.sqrt(err / np.where(norm > 0, norm, 1.0)), np.sqrt(err))


def _same_rows(model: Checkpoint, source: FloatRows, name: str) -> bool:
    """The model's sampled rows of `name` equal the float checkpoint's, byte for byte."""
    return _rows(model, name).tobytes() == source(name).tobytes()


def _mxfp4_problem(model: Checkpoint, original: Checkpoint, weight: Weight) -> str | None:
    """The model's mxfp4 expert module vs the original's blocks/scales bytes."""
    blocks, scales, own = mxfp4_source(weight)
    start, step = own.start or 0, own.step or 1
    for part, name in (("weight", blocks), ("scales", scales)):
        ours = _rows(model, f"{weight.module}.{part}")
        theirs = original.read_row_sample(name, start, step * ERROR_ROW_STRIDE)
        if ours.tobytes() != theirs.tobytes():
            return f"{weight.module}.{part}: differs from the original's {name} (mxfp4 is lossless)"
    return None


def check_integrity(
    *,
    model_dir: Path,
    original_dir: Path,
    quantized_dir: Path,
    tiers: dict[str, Precision],
) -> list[str]:
    """One problem per tensor whose sampled rows are not what its source and tier allow."""
    problems: list[str] = []
    with Checkpoint(model_dir) as model, Checkpoint(original_dir) as original:
        source = FloatRows(original)
        for tier, precision in tiers.items():
            manifest = read_manifest(quantized_dir, tier, precision)
            for module, entry in manifest["modules"].items():
                problem = _module_problem(model, source, module, entry, precision)
                if problem:
                    problems.append(problem)
            for name in manifest["vectors"]:
                if not _same_rows(model, source, name):
                    problems.append(f"{name}: differs from its source in {original_dir}")
    return problems


def _module_problem(
    model: Checkpoint, src: FloatRows, module: str, entry: dict, p: Precision
) -> str:
    """What is wrong with `module` of the model at tier precision `p` ("" if nothing)."""
    if f"{module}.weight" not in model:
        return f"{module}.weight: missing from the model"
    if entry["mode"] == "bf16" or not p.quantized:
        name = f"{module}.weight"
        return "" if _same_rows(model, src, name) else f"{name}: differs from its source"
    if p.mode == "mxfp4":
        return _mxfp4_problem(model, src.original, src.weights[f"{module}.weight"]) or ""
    if f"{module}.scales" not in model or f"{module}.biases" not in model:
        return f"{module}: not affine-quantized in the model (no scales/biases)"
    recorded = float(entry.get("rel_rmse") or 0.0)
    limit = ERROR_FACTOR * recorded + ERROR_FLOOR
    try:
        errors = _affine_errors(model, src, module, p.bits, p.group_size)
    except ValueError as e:  # packed shapes that do not dequantize at these bits
        return f"{module}.weight: does not dequantize at {p.label} ({e})"
    worst = int(np.argmax(errors))
    if not errors[worst] <= limit or not math.isfinite(errors[worst]):
        where = f" (expert {worst})" if errors.size > 1 else ""
        return (
            f"{module}.weight{where}: relative error {errors[worst]:.4g} against its source "
            f"exceeds {limit:.4g} ({ERROR_FACTOR:g} x the {recorded:.4g} recorded at "
            f"quantization + {ERROR_FLOOR:g}) at {p.label}"
        )
    return ""
