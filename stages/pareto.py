"""pareto: this run's (bits per weight, kld_mean, top-1) → metrics/pareto.json."""

from dataclasses import asdict
from pathlib import Path

from tierquant.config import Config
from tierquant.report.pareto import pareto_point
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """One row from paths.validate, labelled by recipe.name and (recipe=auto) budget."""
    pareto_point(
        validate_metrics=Path(config.paths.validate),
        recipe=config.recipe.name,
        budget=asdict(config.budget) if config.recipe.allocate else None,
        out=Path(config.paths.pareto),
    )


if __name__ == "__main__":
    stage_main(run)()
