"""quantize@<tier>: one tier of the model at its precision → data/quantized/<tier>.

Reads data/original (as convert would decode it), never data/float.

Run by hand as `python stages/quantize.py tier=experts [key=value ...]`.
"""

from pathlib import Path

from tierquant.build.quantize import quantize
from tierquant.config import Config
from tierquant.stage import stage_main


def run(config: Config, tier: str) -> None:
    """Quantize the tier's tensors (its plan file) at tiers.<tier> into paths.quantized/<tier>."""
    quantize(
        tier=tier,
        tiers=config.precisions(),
        plan_dir=Path(config.paths.plan),
        original_dir=Path(config.paths.original),
        out_dir=Path(config.paths.quantized) / tier,
        max_shard_bytes=config.model.max_shard_bytes,
    )


if __name__ == "__main__":
    stage_main(run, stage_args=("tier",))()
