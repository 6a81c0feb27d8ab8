"""plan: data/original's config + headers and the recipe → data/plan/<tier>.json."""

from pathlib import Path

from tierquant.config import Config
from tierquant.plan import plan
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """Assign every tensor of the float checkpoint to one recipe tier; write the plan."""
    plan(
        original=Path(config.paths.original),
        recipe=config.recipe,
        out=Path(config.paths.plan),
    )


if __name__ == "__main__":
    stage_main(run)()
