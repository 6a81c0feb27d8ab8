"""benchmark: `python stages/benchmark.py {model|original} [key=value ...]`.

Measures prefill/generation tok/s and peak memory of data/<variant> on this machine and
writes data/benchmark/<variant>.json (the full results), <variant>_speed.json (plot rows)
and the headline metrics metrics/headline/<variant>.json (tok/s at the first context).
"""

import sys
from pathlib import Path

from tierquant.bench import VARIANTS, benchmark
from tierquant.config import Config
from tierquant.headline import write_speed_headline
from tierquant.stage import stage_main

if __name__ == "__main__":
    asks_help = any(a in ("-h", "--help") for a in sys.argv[1:])
    if not asks_help and (len(sys.argv) < 2 or sys.argv[1] not in VARIANTS):
        print(
            f"error: usage: python stages/benchmark.py {{{'|'.join(VARIANTS)}}} [key=value ...]",
            file=sys.stderr,
        )
        sys.exit(2)
    variant = VARIANTS[0] if asks_help else sys.argv.pop(1)

    def run(config: Config) -> None:
        """Time data/<variant> with mlx-lm (prefill, generation, peak memory)."""
        results = benchmark(
            variant=variant,
            model_dir=Path(getattr(config.paths, variant)),
            machine_path=Path(config.paths.machine),
            settings=config.benchmark,
            out_dir=Path(config.paths.benchmark),
        )
        write_speed_headline(
            bench_path=results, variant=variant, headline_dir=Path(config.paths.headline)
        )

    stage_main(run, positional=f"{{{'|'.join(VARIANTS)}}}")()
