"""reference: the original model's log-probs on the eval windows → data/reference."""

from tierquant.evaluate import build_reference
from tierquant.stage import stage_main

if __name__ == "__main__":
    stage_main(build_reference)()
