"""check: every param and cheap input checked before any stage's output is removed."""

import dataclasses
from pathlib import Path

from tierquant.check.preflight import ModelSource, preflight
from tierquant.config import Config
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """Check the params (all of them, typed and in range), the model's shapes and
    tokenizer (no weights), the group size, a budget's feasibility and the eval and
    calibration texts → the stamp paths.check (its bytes never change)."""
    model = config.model
    preflight(
        model=ModelSource(
            source=model.source,
            synthetic=model.synthetic,
            repo_id=model.repo_id,
            revision=model.revision,
            download_params=dataclasses.asdict(model),
            original=Path(config.paths.original),
            lock=Path("dvc.lock"),
        ),
        eval_set=config.eval,
        calibration=config.calibration,
        candidates=list(config.measure.candidates),
        tiers=config.precisions(),
        group_size=config.quant.group_size,
        allocate=config.recipe.allocate,
        budget=config.budget,
        memory=config.memory,
        out=Path(config.paths.check),
    )


if __name__ == "__main__":
    stage_main(run)()
