"""quantize@<tier>: one tier of data/float at its precision → data/quantized/<tier>.

Run by hand as `python stages/quantize.py tier=experts [key=value ...]`.
"""

from tierquant.quantize import quantize
from tierquant.stage import stage_main

if __name__ == "__main__":
    stage_main(quantize, stage_args=("tier",))()
