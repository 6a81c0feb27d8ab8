"""Integrity of every tensor of an assembled model against its source, sampled rows.

Independent of how sensitive the model is to a damaged tensor: each module of each
tier (the tier's manifest, `data/quantized/<tier>/manifest.json`, lists them) is checked
on every `ERROR_ROW_STRIDE`-th row (of every expert, for [E, out, in] stacks), the rows
the quantize stage measured its error on:

- affine-quantized: the model's rows are dequantized (`mx.dequantize` at the tier's bits
  and group size) and compared with the same rows of the float checkpoint. The relative
  RMSE of each expert (or of the whole matrix) must be at most `ERROR_FACTOR` × the error
  the quantize stage recorded for the module at write time (plus `ERROR_FLOOR`). A
  tensor swapped with another of the same shape, a zeroed expert, or a module quantized
  at fewer bits than its tier and stored in the tier's format all exceed it.
- mxfp4 (the original's expert bytes repacked): the rows' bytes equal the original's.
- bf16 (matrices left unquantized, norms, biases, router, sinks): the rows' bytes equal
  the float checkpoint's.

Reads about 1/16 of the model and of its sources (one row at a time, one tensor at a
time), never a whole checkpoint.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import NUMPY_DTYPES, Checkpoint, TensorInfo
from .errors import TierquantError
from .files import read_json
from .precision import Precision
from .quantize import ERROR_ROW_STRIDE, MANIFEST

log = logging.getLogger(__name__)

ERROR_FACTOR = 2.0
ERROR_FLOOR = 1e-3


def sample_rows(
    ckpt: Checkpoint, info: TensorInfo, start: int = 0, step: int = ERROR_ROW_STRIDE
) -> np.ndarray:
    """Rows start, start+step, ... of a tensor, raw, as [slices, picked, rest]: the row
    axis is the first of a matrix and the second of a stack ([E, rows, ...]); `rest`
    flattens what follows it. A vector is read whole. One row is read at a time."""
    if len(info.shape) < 2:
        return ckpt.read(info.name)
    dtype = NUMPY_DTYPES[info.dtype]
    axis = 0 if len(info.shape) == 2 else 1
    lead = int(np.prod(info.shape[:axis], dtype=np.int64))
    rows = info.shape[axis]
    rest = int(np.prod(info.shape[axis + 1 :], dtype=np.int64))
    row_bytes = rest * dtype.itemsize
    picked = range(start, rows, step)
    out = np.empty((lead, len(picked), rest), dtype=dtype)
    f = ckpt._file(info.path)
    for s in range(lead):
        for j, r in enumerate(picked):
            f.seek(info.offset + (s * rows + r) * row_bytes)
            if f.readinto(memoryview(out[s, j].view(np.uint8))) != row_bytes:
                raise TierquantError(f"{info.path}: short read of tensor {info.name!r}")
    return out


def _affine_errors(
    model: Checkpoint, src: Checkpoint, module: str, bits: int, group_size: int
) -> np.ndarray:
    """Relative RMSE of the model's dequantized sampled rows against the float ones, per
    leading slice (expert) — one value for a 2-D matrix."""
    import mlx.core as mx

    w, scales, biases = (
        mx.array(sample_rows(model, model.info(f"{module}.{part}")))
        for part in ("weight", "scales", "biases")
    )
    ref = mx.array(sample_rows(src, src.info(f"{module}.weight"))).view(mx.bfloat16)
    ref = ref.astype(mx.float32)
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


def _same_rows(a: Checkpoint, a_name: str, b: Checkpoint, b_name: str) -> bool:
    """The sampled rows of a_name and b_name are equal, byte for byte."""
    left = sample_rows(a, a.info(a_name))
    return left.tobytes() == sample_rows(b, b.info(b_name)).tobytes()


def _mxfp4_problem(model: Checkpoint, original: Checkpoint, module: str) -> str | None:
    """The model's mxfp4 expert module vs the original's blocks/scales bytes (gate_up
    is interleaved by row: gate rows are the even ones, up rows the odd ones)."""
    layer_prefix, kind = module.rsplit(".", 1)
    source = "down_proj" if kind == "down_proj" else "gate_up_proj"
    start, step = (0, 1) if kind == "down_proj" else (int(kind == "up_proj"), 2)
    for part, suffix in (("weight", "blocks"), ("scales", "scales")):
        name = f"{layer_prefix}.{source}_{suffix}"
        ours = sample_rows(model, model.info(f"{module}.{part}"))
        theirs = sample_rows(original, original.info(name), start, step * ERROR_ROW_STRIDE)
        if ours.tobytes() != theirs.tobytes():
            return f"{module}.{part}: differs from the original's {name} (mxfp4 is lossless)"
    return None


def check_integrity(
    *,
    model_dir: Path,
    float_dir: Path,
    original_dir: Path,
    quantized_dir: Path,
    tiers: dict[str, Precision],
) -> list[str]:
    """One problem per tensor whose sampled rows are not what its source and tier allow."""
    problems: list[str] = []
    with (
        Checkpoint(model_dir) as model,
        Checkpoint(float_dir) as src,
        Checkpoint(original_dir) as original,
    ):
        for tier, precision in tiers.items():
            path = Path(quantized_dir) / tier / MANIFEST
            if not path.is_file():
                raise TierquantError(f"{path}: missing; run the quantize@{tier} stage")
            manifest = read_json(path)
            for module, entry in manifest["modules"].items():
                problem = _module_problem(model, src, original, module, entry, precision)
                if problem:
                    problems.append(problem)
            for name in manifest["vectors"]:
                if not _same_rows(model, name, src, name):
                    problems.append(f"{name}: differs from {float_dir}'s {name}")
    return problems


def _module_problem(
    model: Checkpoint,
    src: Checkpoint,
    original: Checkpoint,
    module: str,
    entry: dict[str, Any],
    precision: Precision,
) -> str | None:
    if f"{module}.weight" not in model:
        return f"{module}.weight: missing from the model"
    if entry["mode"] == "bf16" or not precision.quantized:
        name = f"{module}.weight"
        return None if _same_rows(model, name, src, name) else f"{name}: differs from its source"
    if precision.mode == "mxfp4":
        return _mxfp4_problem(model, original, module)
    if f"{module}.scales" not in model or f"{module}.biases" not in model:
        return f"{module}: not affine-quantized in the model (no scales/biases)"
    recorded = float(entry.get("rel_rmse") or 0.0)
    limit = ERROR_FACTOR * recorded + ERROR_FLOOR
    try:
        errors = _affine_errors(model, src, module, precision.bits, precision.group_size)
    except ValueError as e:  # packed shapes that do not dequantize at these bits
        return f"{module}.weight: does not dequantize at {precision.label} ({e})"
    worst = int(np.argmax(errors))
    if not errors[worst] <= limit or not math.isfinite(errors[worst]):
        where = f" (expert {worst})" if errors.size > 1 else ""
        return (
            f"{module}.weight{where}: relative error {errors[worst]:.4g} against its source "
            f"exceeds {limit:.4g} ({ERROR_FACTOR:g} x the {recorded:.4g} recorded at "
            f"quantization + {ERROR_FLOOR:g}) at {precision.label}"
        )
    return None
