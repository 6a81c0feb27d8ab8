"""validate: data/model vs data/reference (+ plan, tiers) → metrics; fails past the gate."""

from pathlib import Path

from tierquant.config import Config
from tierquant.stage import stage_main
from tierquant.validate import validate_model


def validate(config: Config) -> None:
    """paths.model vs paths.reference (quality), plan + tiers (structure), paths.float /
    paths.original + the tier manifests in paths.quantized (integrity) → paths.validate
    metrics, then the gate."""
    validate_model(
        model_dir=Path(config.paths.model),
        reference_dir=Path(config.paths.reference),
        plan_dir=Path(config.paths.plan),
        float_dir=Path(config.paths.float),
        original_dir=Path(config.paths.original),
        quantized_dir=Path(config.paths.quantized),
        tiers=config.precisions(),
        thresholds=config.validate,
        metrics_path=Path(config.paths.validate),
    )


if __name__ == "__main__":
    stage_main(validate)()
