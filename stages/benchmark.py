"""benchmark: `python stages/benchmark.py {model|original} [key=value ...]`.

Measures prefill/generation tok/s and peak memory of data/<variant> on this machine and
writes data/benchmark/<variant>.json (metrics) and <variant>_speed.json (plot rows).
"""

import functools
import sys
from pathlib import Path

from tierquant.bench import VARIANTS, benchmark
from tierquant.config import Config
from tierquant.stage import stage_main


def run(config: Config, variant: str) -> None:
    """Benchmark paths.<variant> (model or original) into paths.benchmark."""
    benchmark(
        variant=variant,
        model_dir=Path(getattr(config.paths, variant)),
        machine_path=Path(config.paths.machine),
        settings=config.benchmark,
        out_dir=Path(config.paths.benchmark),
    )


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        print(
            f"error: usage: python stages/benchmark.py {{{'|'.join(VARIANTS)}}} [key=value ...]",
            file=sys.stderr,
        )
        sys.exit(2)
    variant = sys.argv.pop(1)
    stage_main(functools.partial(run, variant=variant))()
