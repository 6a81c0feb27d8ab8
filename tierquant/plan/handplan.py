"""plan stage, hand recipe: which tensors form each tier, by the recipe's rules.

The tensors (mlx-lm names, as the quantized model holds them) follow from the
original's config.json (`gptoss.mlx_weights`), so plan reads only `config.json` and the
original's safetensors headers (to check they agree) and runs on a 120B checkpoint in
well under a second, without the weights. It writes the plan files
(tierquant.plan.planfile).
"""

from __future__ import annotations

import logging
from pathlib import Path

from tierquant.core.files import read_json
from tierquant.core.gptoss import GptOssShape, Weight, mlx_weights, verify_original
from tierquant.errors import TierquantError
from tierquant.plan.planfile import log_plan, write_plan
from tierquant.plan.recipe import RecipeConfig, assign, check_recipe, typed_rules

log = logging.getLogger(__name__)


def plan_tiers(shape: GptOssShape, recipe: RecipeConfig) -> dict[str, list[Weight]]:
    """Tier -> weights for a model of `shape`; every tensor in exactly one tier."""
    if not recipe.tiers:
        raise TierquantError(f"params: recipe {recipe.name!r} has no tiers (recipe.tiers)")
    recipe = RecipeConfig(recipe.name, recipe.edge_layers, typed_rules(recipe.tiers))
    check_recipe(recipe)
    return assign(mlx_weights(shape), recipe, shape.num_hidden_layers)


def plan(*, original: Path, recipe: RecipeConfig, out: Path) -> dict[str, list[Weight]]:
    """Write `out/<tier>.json` for every tier of `recipe`, from `original`'s headers.

    Atomic: `out` is replaced as a whole, or left as it was on any error.
    """
    original = Path(original)
    ckpt = verify_original(original)  # headers + config.json agree (no tensor data read)
    ckpt.close()
    shape = GptOssShape.from_config(read_json(original / "config.json"))
    tiers = plan_tiers(shape, recipe)
    write_plan(Path(out), tiers)
    log_plan(tiers)
    log.info("wrote %s: recipe %r, %d tiers", out, recipe.name, len(tiers))
    return tiers
