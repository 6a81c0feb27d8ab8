"""benchmark@<variant>: data/<variant> (model or original) → its speed and memory.

Measures prefill/generation tok/s and peak memory on this machine and writes
data/benchmark/<variant>.json (the full results), <variant>_speed.json (plot rows) and
the headline metrics metrics/headline/<variant>.json (tok/s at the first context).

Run by hand as `python stages/benchmark.py variant=model [key=value ...]`.
"""

from pathlib import Path

from tierquant.config import Config
from tierquant.errors import TierquantError
from tierquant.report.benchmark import VARIANTS, benchmark
from tierquant.report.headline import write_speed_headline
from tierquant.stage import stage_main


def run(config: Config, variant: str) -> None:
    """Time data/<variant> with mlx-lm (prefill, generation, peak memory)."""
    if variant not in VARIANTS:
        raise TierquantError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    results = benchmark(
        variant=variant,
        model_dir=Path(getattr(config.paths, variant)),
        machine_path=Path(config.paths.machine),
        settings=config.benchmark,
        memory_model=config.memory,
        out_dir=Path(config.paths.benchmark),
    )
    write_speed_headline(
        bench_path=results, variant=variant, headline_dir=Path(config.paths.headline)
    )


if __name__ == "__main__":
    stage_main(run, stage_args=("variant",))()
