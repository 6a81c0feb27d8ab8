"""card: this run's metrics → data/card/README.md, the model card (ModelCard + template)."""

from tierquant.card import build_card
from tierquant.stage import stage_main

if __name__ == "__main__":
    stage_main(build_card)()
