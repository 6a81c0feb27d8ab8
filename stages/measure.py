"""measure@damage: damage of each allocation group at each candidate precision → data/measure.

Exists for a recipe that allocates (recipe=auto) only: dvc.yaml's foreach over
`recipe.allocation`.
"""

from pathlib import Path

from tierquant.config import Config
from tierquant.quality.measure import measure
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """Stream the original checkpoint (paths.original) over the calibration windows
    (paths.calibration) and score every group at measure.candidates (quant.group_size),
    rounded as measure.rounding says (rtn or gptq) → paths.measure, and
    paths.measure_plot (the heatmap's CSV)."""
    measure(
        original=Path(config.paths.original),
        windows=Path(config.paths.calibration),
        candidates=list(config.measure.candidates),
        group_size=config.quant.group_size,
        batch_size=config.calibration.batch_size,
        out=Path(config.paths.measure),
        plot=Path(config.paths.measure_plot),
        carry_layers=config.measure.carry_layers,
        rounding=config.measure.rounding,
    )


if __name__ == "__main__":
    stage_main(run)()
