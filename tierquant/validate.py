"""validate stage: structural checks + quality against the reference, then the gate.

`validate_model` loads only the quantized model (tierquant.evaluate.quality_metrics
reads the reference from data/reference, never the original), so peak memory is the
quantized model plus one eval batch. Metrics go to `paths.validate` (a DVC metrics
file) BEFORE the gate raises, so a failed run can be inspected with `dvc metrics show`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import Config, ValidateConfig
from .errors import TierquantError
from .evaluate import quality_metrics
from .files import atomic_output, write_json
from .structure import check_structure

log = logging.getLogger(__name__)


# --- gate -----------------------------------------------------------------------------------

# threshold key -> (metric, kind): "max" fails when value > t, "min" when value < t.
GATES: dict[str, tuple[str, str]] = {
    "kld_mean_max": ("kld_mean", "max"),
    "kld_p99_max": ("kld_p99", "max"),
    "kld_max_max": ("kld_max", "max"),
    "top1_min": ("top1_agreement", "min"),
    "ppl_ratio_max": ("ppl_ratio", "max"),
}


def gate_failures(metrics: dict[str, float], thresholds: ValidateConfig) -> list[str]:
    """One message per threshold the metrics violate (none set → none checked)."""
    failures = []
    for key, (metric, kind) in GATES.items():
        limit = getattr(thresholds, key)
        if limit is None:
            continue
        value = metrics[metric]
        if (kind == "max" and not value <= limit) or (kind == "min" and not value >= limit):
            verb = "exceeds" if kind == "max" else "is below"
            failures.append(
                f"validate: {metric} = {value:.6g} {verb} threshold {limit:g} (validate.{key})"
            )
    return failures


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write the metrics JSON as a fresh file (temporary + rename: atomic_output, which
    also removes the temporary and names the file if the disk is full)."""
    with atomic_output(Path(path), is_dir=False) as tmp:
        write_json(tmp, metrics)


# --- the validate stage -----------------------------------------------------------------------


def validate_model(
    *,
    model_dir: Path,
    reference_dir: Path,
    plan_dir: Path,
    tiers: dict[str, Any],
    thresholds: ValidateConfig,
    metrics_path: Path,
) -> dict[str, Any]:
    """Structural checks + quality vs the reference; write metrics, then gate.

    `tiers` maps tier -> tierquant.recipe.Precision. Metrics are written before any
    failure is raised, so a failed run can be inspected. Raises TierquantError listing
    every failure, one per line (`validate: <metric> = <value> exceeds threshold ...`).
    """
    report = check_structure(model_dir, plan_dir, tiers, bpw_tolerance=thresholds.bpw_tolerance)
    failures = [f"validate: structure: {p}" for p in report.problems]
    metrics: dict[str, Any] = {}
    try:
        metrics.update(quality_metrics(model_dir, reference_dir))
    except Exception:
        if not failures:  # a broken structure may stop the model loading; say why
            raise
        log.exception("the model did not run")
        failures.append("validate: the model did not run (see the structure problems above)")
    metrics.update(report.metrics())
    if "kld_mean" in metrics:
        failures = gate_failures(metrics, thresholds) + failures
    metrics["passed"] = not failures
    write_metrics(metrics_path, metrics)
    for key in ("kld_mean", "kld_p99", "top1_agreement", "ppl_ratio", "bits_per_weight"):
        if key in metrics:
            log.info("  %-16s %.6g", key, metrics[key])
    if failures:
        raise TierquantError("\n".join(failures))
    log.info("validate: passed (%s)", metrics_path)
    return metrics


def validate(config: Config) -> dict[str, Any]:
    """The validate stage: paths.model vs paths.reference, plan + tiers → metrics, gate."""
    return validate_model(
        model_dir=Path(config.paths.model),
        reference_dir=Path(config.paths.reference),
        plan_dir=Path(config.paths.plan),
        tiers=config.precisions(),
        thresholds=config.validate,
        metrics_path=Path(config.paths.validate),
    )
