"""calibration@damage: the calibration windows (kept off the eval windows) → data/calibration.npy.

measure reads its token windows from here, not from the texts: a change of `eval` that
leaves the calibration windows as they were reruns this seconds-long stage, whose output
is then unchanged, and never measure.
"""

from pathlib import Path

from tierquant.config import Config
from tierquant.quality.calibration import write_calibration_windows
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """Tokenize the calibration text (calibration.*) with the original's tokenizer and
    place its windows off the eval windows (eval.*) → paths.calibration."""
    write_calibration_windows(
        calibration=config.calibration,
        eval_set=config.eval,
        original=Path(config.paths.original),
        out=Path(config.paths.calibration),
    )


if __name__ == "__main__":
    stage_main(run)()
