"""machine: record this machine (OS, chip, memory, MLX versions, backend) in data/machine.json."""

from pathlib import Path

from tierquant.config import Config
from tierquant.report.machine import write_machine
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """Write paths.machine: what this machine and its MLX stack are."""
    write_machine(Path(config.paths.machine))


if __name__ == "__main__":
    stage_main(run)()
