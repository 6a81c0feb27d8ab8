"""validate: data/model vs data/reference (+ plan, tiers) → metrics; fails past the gate."""

from tierquant.stage import stage_main
from tierquant.validate import validate

if __name__ == "__main__":
    stage_main(validate)()
