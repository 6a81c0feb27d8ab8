"""The quantized tiers' format: what tensors a weight becomes at a precision
(`quantized_specs`: mlx-lm's names, dtypes and shapes), and each tier's
`data/quantized/<tier>/manifest.json`, recording per module its bits, group size, mode,
parameters and the quantization error measured on every ERROR_ROW_STRIDE-th row.
Written by quantize; read by assemble, the structure check and the integrity check.
"""

from __future__ import annotations

from pathlib import Path

from tierquant.core.checkpoint import TensorSpec
from tierquant.core.files import read_json
from tierquant.core.gptoss import Weight
from tierquant.core.mxfp4 import GROUP_SIZE as MXFP4_GROUP
from tierquant.core.precision import Precision
from tierquant.errors import TierquantError

MANIFEST = "manifest.json"
ERROR_ROW_STRIDE = 16  # quantization error measured on every 16th row


def quantized_specs(weight: Weight, precision: Precision) -> list[TensorSpec]:
    """The tensors a weight becomes at `precision` (mlx-lm's names, dtypes and shapes)."""
    if not precision.stores_quantized(weight.kind):
        return [TensorSpec(weight.name, "BF16", weight.shape)]
    *lead, rows, cols = weight.shape
    module = weight.module
    if precision.mode == "mxfp4":  # 8 codes of 4 bits per uint32, one E8M0 byte per block
        return [
            TensorSpec(f"{module}.weight", "U32", (*lead, rows, cols // 8)),
            TensorSpec(f"{module}.scales", "U8", (*lead, rows, cols // MXFP4_GROUP)),
        ]
    groups = cols // precision.group_size
    return [
        TensorSpec(f"{module}.weight", "U32", (*lead, rows, cols * precision.bits // 32)),
        TensorSpec(f"{module}.scales", "BF16", (*lead, rows, groups)),
        TensorSpec(f"{module}.biases", "BF16", (*lead, rows, groups)),
    ]


def read_manifest(quantized_dir: Path, tier: str, precision: Precision) -> dict:
    """The manifest of quantize@<tier>, checked: it exists and was written at
    `precision` (the tier's current `tiers.<tier>`)."""
    path = Path(quantized_dir) / tier / MANIFEST
    if not path.is_file():
        raise TierquantError(
            f"{path} is missing: tier {tier!r} has not been quantized (run `dvc repro`)"
        )
    manifest = read_json(path)
    expected = precision.quantization() or {"mode": "bf16"}
    if manifest.get("precision") != expected:
        raise TierquantError(
            f"{path}: tier {tier!r} was quantized as {manifest.get('precision')} but "
            f"tiers.{tier} now asks for {expected}; rerun quantize@{tier} (`dvc repro`)"
        )
    return manifest
