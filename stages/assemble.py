"""assemble: every tier's shards (linked, not copied) → data/model, a stock mlx-lm model."""

from pathlib import Path

from tierquant.build.assemble import assemble_model
from tierquant.config import Config
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """Link every tier's shards into paths.model; write its config, index and size metrics."""
    paths = config.paths
    assemble_model(
        tiers=config.precisions(),
        quantized_dir=Path(paths.quantized),
        original_dir=Path(paths.original),
        out_dir=Path(paths.model),
        size_metrics=Path(paths.size_metrics),
        error_plot=Path(paths.quant_error_plot),
    )


if __name__ == "__main__":
    stage_main(run)()
