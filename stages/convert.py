"""convert: data/original (MXFP4) → data/float (bf16, mlx-lm names), exact and streaming."""

from tierquant.convert import convert
from tierquant.stage import stage_main

if __name__ == "__main__":
    stage_main(convert)()
