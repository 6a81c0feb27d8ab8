"""convert: data/original (MXFP4) → data/float (bf16, mlx-lm names), exact and streaming."""

from pathlib import Path

from tierquant.config import Config
from tierquant.source.convert import convert_checkpoint
from tierquant.stage import stage_main


def run(config: Config) -> None:
    """Dequantize the experts exactly and write paths.float in mlx-lm names."""
    convert_checkpoint(
        Path(config.paths.original),
        Path(config.paths.float),
        max_shard_bytes=config.model.max_shard_bytes,
    )


if __name__ == "__main__":
    stage_main(run)()
