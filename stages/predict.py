"""predict: data/plan + tiers + quant → metrics/predicted_size.json (bytes, bits per weight)."""

from pathlib import Path

from tierquant.config import Config
from tierquant.plan.predict import predict
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """Predict each tier's and the model's size from the plan and the tiers' bits."""
    predict(
        plan_dir=Path(config.paths.plan),
        original=Path(config.paths.original),
        tiers=dict(config.tiers),
        group_size=config.quant.group_size,
        out=Path(config.paths.predict),
    )


if __name__ == "__main__":
    stage_main(run)()
