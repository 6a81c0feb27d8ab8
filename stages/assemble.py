"""assemble: every tier's shards (linked, not copied) → data/model, a stock mlx-lm model."""

from tierquant.assemble import assemble
from tierquant.stage import stage_main

if __name__ == "__main__":
    stage_main(assemble)()
