"""validate: data/model vs data/reference (+ plan, tiers) → metrics; fails past the gate."""

from pathlib import Path

from tierquant.check.validate import validate_model
from tierquant.config import Config
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """paths.model vs paths.reference (quality), plan + tiers (structure),
    paths.original + the tier manifests in paths.quantized (integrity) → paths.validate
    metrics and paths.headline/quality.json, then the gate."""
    validate_model(
        model_dir=Path(config.paths.model),
        reference_dir=Path(config.paths.reference),
        plan_dir=Path(config.paths.plan),
        original_dir=Path(config.paths.original),
        quantized_dir=Path(config.paths.quantized),
        tiers=config.precisions(),
        thresholds=config.validate,
        metrics_path=Path(config.paths.validate),
        headline_dir=Path(config.paths.headline),
    )


if __name__ == "__main__":
    stage_main(run)()
