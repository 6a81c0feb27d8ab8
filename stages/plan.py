"""plan: data/original's config + headers and the recipe → data/plan/<tier>.json.

recipe=auto (`recipe.allocate`): each allocation group's precision from data/measure and
`budget` instead of rules (tierquant.plan.autoplan)."""

from pathlib import Path

from tierquant.config import Config
from tierquant.plan.autoplan import auto_plan
from tierquant.plan.handplan import plan
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """Assign every tensor of the float checkpoint to one recipe tier; write the plan."""
    if config.recipe.allocate:
        auto_plan(
            original=Path(config.paths.original),
            measure_dir=Path(config.paths.measure),
            budget=config.budget,
            memory=config.memory,
            group_size=config.quant.group_size,
            out=Path(config.paths.plan),
        )
        return
    plan(
        original=Path(config.paths.original),
        recipe=config.recipe,
        out=Path(config.paths.plan),
    )


if __name__ == "__main__":
    stage_main(run)()
