"""machine: record this machine (OS, chip, memory, MLX versions, backend) in data/machine.json."""

from tierquant.machine import write_machine
from tierquant.stage import stage_main

if __name__ == "__main__":
    stage_main(write_machine)()
