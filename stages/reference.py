"""reference: the original model's log-probs on the eval windows → data/reference."""

from pathlib import Path

from tierquant.config import Config
from tierquant.quality.evaluate import build_reference
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """Stream the original (paths.original) over the eval set (eval.*) → paths.reference."""
    build_reference(
        original=Path(config.paths.original),
        out=Path(config.paths.reference),
        eval_config=config.eval,
    )


if __name__ == "__main__":
    stage_main(run)()
