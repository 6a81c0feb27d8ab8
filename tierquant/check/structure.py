"""Structural checks of an assembled model against the plan and the tier params.

`check_structure(model_dir, plan_dir, tiers)` reads safetensors headers, config.json and
`plan_dir/<tier>.json`; it evaluates no weights. It checks that config.json's `quantization`
(and `quantization_config`) gives every planned module its tier's precision and every
bf16 module none, and that stock mlx-lm's loader accepts config.json and the tensors
(`loader_problem`: built lazily, no weight data read); that every tensor has the dtype
and shape of that precision (so the bits stored are the bits asked for); that nothing
unplanned is present; that no float tensor holds NaN or Inf and no mxfp4 scale byte is
255 (E8M0's NaN) (streamed in row slices, one tensor at a time); and that the
model's bits per weight, counted from the bytes on disk, equals the plan's prediction
(tierquant.plan.predict.tier_size) within `validate.bpw_tolerance`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from tierquant.build.manifest import quantized_specs
from tierquant.core.checkpoint import Checkpoint, TensorInfo
from tierquant.core.files import read_json
from tierquant.core.gptoss import MATRIX_KINDS, Weight
from tierquant.core.mxfp4 import NAN_SCALE
from tierquant.core.precision import Precision
from tierquant.errors import TierquantError
from tierquant.plan.planfile import check_tiers_match_plan, plan_tier_names, read_plan
from tierquant.plan.size import tier_size

FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
SCAN_BYTES = 64 << 20  # bytes read at a time by the NaN/Inf scan


@dataclass
class StructureReport:
    """Problems found (empty: the model is as planned) and the size figures."""

    problems: list[str] = field(default_factory=list)
    tensors: int = 0
    nonfinite_tensors: int = 0
    params: int = 0
    bytes: int = 0
    bits_per_weight: float = 0.0
    bits_per_weight_predicted: float = 0.0

    def metrics(self) -> dict[str, Any]:
        return {
            "structure_problems": len(self.problems),
            "nonfinite_tensors": self.nonfinite_tensors,
            "tensors": self.tensors,
            "bits_per_weight": self.bits_per_weight,
            "bits_per_weight_predicted": self.bits_per_weight_predicted,
        }


def nonfinite_count(ckpt: Checkpoint, info: TensorInfo, *, e8m0: bool = False) -> int:
    """NaN/Inf values in one float tensor, or NaN scale bytes (255) in an E8M0 scales
    tensor (`e8m0`: an mxfp4 module's `scales`), read SCAN_BYTES at a time."""
    if not e8m0 and info.dtype not in FLOAT_DTYPES:
        return 0
    bad = 0
    for raw in ckpt.iter_rows(info.name, SCAN_BYTES):
        if e8m0:
            bad += int(np.count_nonzero(raw == NAN_SCALE))
        elif info.dtype == "BF16":  # uint16 bit patterns: exponent all ones
            bad += int(np.count_nonzero((raw & 0x7F80) == 0x7F80))
        else:
            bad += int(np.count_nonzero(~np.isfinite(raw)))
    return bad


def loader_problem(model_dir: Path) -> str | None:
    """Why stock mlx-lm's loader refuses `model_dir`, or None if it accepts it.

    `mlx_lm.utils.load_model(lazy=True)`: mlx-lm's own model classes built from
    config.json, its quantization map applied, every tensor's name and shape checked
    against them; no weight data is read (MLX loads lazily, nothing is evaluated).
    """
    from mlx_lm.utils import load_model

    try:
        model, _ = load_model(Path(model_dir), lazy=True)
    except Exception as e:  # mlx-lm raises many types; the message is what helps
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return (
            f"config.json: stock mlx-lm's loader (mlx_lm.load) rejects the model: "
            f"{type(e).__name__}: {first}"
        )
    del model
    return None


def _config_entry(config_q: dict[str, Any] | None, module: str) -> tuple[bool, Any]:
    """(has an entry, entry) of `module` in config.json's `quantization` map."""
    if not config_q:
        return True, None  # no quantization at all: every module bf16
    return module in config_q, config_q.get(module)


def _actual_bits(infos: dict[str, TensorInfo], module: str, group_size: int) -> str:
    """A human form of what the module's tensors hold (for messages)."""
    w, s = infos.get(f"{module}.weight"), infos.get(f"{module}.scales")
    if w is None:
        return "no weight"
    if s is None or w.dtype != "U32":
        return f"{w.dtype} (unquantized)"
    cols = s.shape[-1] * group_size
    return f"{w.shape[-1] * 32 / cols:g} bits at group {group_size}" if cols else "?"


def check_structure(
    model_dir: Path, plan_dir: Path, tiers: dict[str, Precision], *, bpw_tolerance: float = 0.01
) -> StructureReport:
    """Check `model_dir` against `plan_dir/<tier>.json` and `tiers` (see module doc)."""
    report = StructureReport()
    problems = report.problems
    planned = set(plan_tier_names(plan_dir))
    try:
        check_tiers_match_plan(plan_dir, tiers)
    except TierquantError as e:
        problems.append(str(e))
    config = read_json(Path(model_dir) / "config.json")
    config_q = config.get("quantization")
    if config.get("quantization_config") != config_q:
        problems.append("config.json: quantization_config differs from quantization")

    with Checkpoint(model_dir) as ckpt:
        infos = ckpt.tensors
        expected: set[str] = set()
        e8m0: set[str] = set()  # mxfp4 modules' scales
        numel, predicted_bits = 0, Fraction(0)
        for tier, precision in tiers.items():
            if tier not in planned:
                continue
            plan = read_plan(plan_dir, tier)
            n, bits = tier_size(tier, plan, precision)
            numel, predicted_bits = numel + n, predicted_bits + bits
            for t in plan["tensors"]:
                w = Weight(t["name"], t["kind"], t.get("layer"), None, tuple(t["shape"]))
                specs = quantized_specs(w, precision)
                expected.update(s.name for s in specs)
                if precision.mode == "mxfp4":
                    e8m0.update(s.name for s in specs if s.name.endswith(".scales"))
                for spec in specs:
                    info = infos.get(spec.name)
                    if info is None:
                        problems.append(f"{spec.name}: missing (tier {tier!r})")
                    elif (info.dtype, info.shape) != (spec.dtype, spec.shape):
                        actual = _actual_bits(infos, w.module, precision.group_size or 32)
                        problems.append(
                            f"{spec.name}: {info.dtype}{list(info.shape)}, expected "
                            f"{spec.dtype}{list(spec.shape)} for tier {tier!r} "
                            f"({precision.label}, tiers.{tier}); holds {actual}"
                        )
                if w.kind in MATRIX_KINDS:
                    has, entry = _config_entry(config_q, w.module)
                    want = precision.quantization()
                    if not has:
                        problems.append(
                            f"config.json quantization has no entry for {w.module!r}; "
                            f"expected {want or False!r} (tier {tier!r})"
                        )
                    elif (want or None) != (entry or None):
                        problems.append(
                            f"config.json quantization[{w.module!r}] = {entry!r}, expected "
                            f"{want!r} for tier {tier!r} (tiers.{tier} = {precision.label})"
                        )
        for name in sorted(set(infos) - expected):
            problems.append(f"{name}: in the model but in no tier's plan")
        for name, info in infos.items():
            bad = nonfinite_count(ckpt, info, e8m0=name in e8m0)
            if bad:
                report.nonfinite_tensors += 1
                what = "NaN scale byte(s) (E8M0 255)" if name in e8m0 else "NaN/Inf value(s)"
                problems.append(f"{name}: {bad} {what}")
        report.tensors = len(infos)
        report.bytes = ckpt.nbytes
    loader = loader_problem(model_dir)
    if loader:
        problems.append(loader)
    if numel == 0:
        raise TierquantError(f"{plan_dir}: the plan lists no tensors; rerun the plan stage")
    report.params = numel
    report.bits_per_weight = report.bytes * 8 / numel
    report.bits_per_weight_predicted = float(predicted_bits / numel)
    gap = abs(report.bits_per_weight - report.bits_per_weight_predicted)
    if gap > bpw_tolerance * report.bits_per_weight_predicted:
        problems.append(
            f"bits_per_weight = {report.bits_per_weight:.4f} differs from the plan's "
            f"prediction {report.bits_per_weight_predicted:.4f} by more than "
            f"{bpw_tolerance:g} (validate.bpw_tolerance)"
        )
    return report
