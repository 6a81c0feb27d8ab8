"""validate stage: structural checks + quality against the reference, then the gate.

`validate_model` streams only the quantized model layer by layer
(tierquant.quality.evaluate.quality_metrics reads the reference from data/reference, never the
original), so peak memory is one layer plus the eval set's hidden states. Metrics go to
`paths.validate` (a DVC metrics file) BEFORE the gate raises, so a failed run can be
inspected with `dvc metrics show`. The file's "gate" list holds one verdict per
threshold param (null threshold: not checked, "passed": null); "passed" is true when
there is no structure problem and every checked threshold passed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierquant.check.integrity import check_integrity
from tierquant.check.structure import check_structure
from tierquant.core.files import atomic_output, write_json
from tierquant.errors import TierquantError
from tierquant.quality.evaluate import quality_metrics
from tierquant.report.headline import write_quality_headline

log = logging.getLogger(__name__)


@dataclass
class QualityGate:
    """The quality gate's thresholds (params: `validate`; None disables one) and the
    structural tolerance of bits per weight against the prediction."""

    kld_mean_max: float | None = None
    kld_p99_max: float | None = None
    kld_max_max: float | None = None
    top1_min: float | None = None
    ppl_ratio_max: float | None = None
    bpw_tolerance: float = 0.01  # relative: |actual - predicted| / predicted


# --- gate -----------------------------------------------------------------------------------

# threshold key -> (metric, kind): "max" fails when value > t, "min" when value < t.
GATES: dict[str, tuple[str, str]] = {
    "kld_mean_max": ("kld_mean", "max"),
    "kld_p99_max": ("kld_p99", "max"),
    "kld_max_max": ("kld_max", "max"),
    "top1_min": ("top1_agreement", "min"),
    "ppl_ratio_max": ("ppl_ratio", "max"),
}


def gate_verdicts(metrics: dict[str, Any], thresholds: QualityGate) -> list[dict[str, Any]]:
    """One entry per threshold param: metric, op, threshold, value, passed (null when the
    threshold is null or the metric was not measured)."""
    verdicts = []
    for key, (metric, kind) in GATES.items():
        limit = getattr(thresholds, key)
        value = metrics.get(metric)
        passed = None
        if limit is not None and value is not None:
            passed = bool(value <= limit) if kind == "max" else bool(value >= limit)
        verdicts.append(
            {
                "param": f"validate.{key}",
                "metric": metric,
                "op": "<=" if kind == "max" else ">=",
                "threshold": limit,
                "value": value,
                "passed": passed,
            }
        )
    return verdicts


def gate_failures(verdicts: list[dict[str, Any]]) -> list[str]:
    """One message per failed verdict."""
    failures = []
    for v in verdicts:
        if v["passed"] is False:
            verb = "exceeds" if v["op"] == "<=" else "is below"
            failures.append(
                f"validate: {v['metric']} = {v['value']:.6g} {verb} threshold "
                f"{v['threshold']:g} ({v['param']})"
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
    original_dir: Path,
    quantized_dir: Path,
    tiers: dict[str, Any],
    thresholds: QualityGate,
    metrics_path: Path,
    headline_dir: Path | None = None,
) -> dict[str, Any]:
    """Structural checks + quality vs the reference; write metrics, then gate. The
    headline metrics (`headline_dir`/quality.json, if given) are written whatever the
    verdict (passed: false on a failure).

    `tiers` maps tier -> tierquant.core.precision.Precision. Metrics are written before a
    structure, integrity or gate failure is raised, so a failed run can be inspected
    (when the model cannot be evaluated at all, e.g. the reference is missing, nothing is
    written). Raises TierquantError listing every failure, one per line (`validate:
    <metric> = <value> exceeds threshold ...`).
    """
    try:
        report = check_structure(model_dir, plan_dir, tiers, bpw_tolerance=thresholds.bpw_tolerance)
        failures = [f"validate: structure: {p}" for p in report.problems]
        try:
            integrity = check_integrity(
                model_dir=model_dir,
                original_dir=original_dir,
                quantized_dir=quantized_dir,
                tiers=tiers,
            )
        except TierquantError as e:
            integrity = [str(e)]
        if integrity:  # one line, naming every tensor
            failures.append(
                f"validate: integrity: {len(integrity)} tensor(s) not what their source and "
                f"tier allow: {'; '.join(integrity)}"
            )
        metrics: dict[str, Any] = {}
        try:
            metrics.update(quality_metrics(model_dir=model_dir, reference_dir=reference_dir))
        except TierquantError as e:
            # Bad input (no or a broken reference, an unloadable model): say so beside any
            # structure/integrity problem, in one error, and leave the previous metrics as
            # they were (nothing half-measured is written).
            raise TierquantError("\n".join([*failures, f"validate: {e}"])) from e
        except Exception as e:
            if not failures:  # not explained by the structure: a bug, keep its traceback
                raise
            # A broken structure may stop the model loading: say so in one line.
            failures.append(
                f"validate: the model did not run ({type(e).__name__}: {e}); "
                "see the structure problems above"
            )
        metrics.update(report.metrics())
        metrics["integrity_problems"] = len(integrity)
        verdicts = gate_verdicts(metrics, thresholds)
        failures = gate_failures(verdicts) + failures
        metrics["gate"] = verdicts
        metrics["passed"] = not failures
        write_metrics(metrics_path, metrics)
        for key in ("kld_mean", "kld_p99", "top1_agreement", "ppl_ratio", "bits_per_weight"):
            if key in metrics:
                log.info("  %-16s %.6g", key, metrics[key])
        if failures:
            raise TierquantError("\n".join(failures))
        log.info("validate: passed (%s)", metrics_path)
        return metrics
    finally:
        if headline_dir is not None:
            write_quality_headline(
                validate_path=Path(metrics_path), headline_dir=Path(headline_dir)
            )
