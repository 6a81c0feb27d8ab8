"""What to expect on a Mac: the memory model's PREDICTIONS for gpt-oss-120b and -20b.

Nothing here is measured. From the real checkpoints' shapes (tests/headers.py: the
sizes of openai/gpt-oss-120b and -20b; no weights, no network) and the committed params
(`memory:` and `benchmark.chips`), for a recipe (default: the seed's) and the original
MXFP4 checkpoint: the stored bytes, bytes read per generated token, the fit table
(which Mac memory sizes hold the model, and the longest context whose bf16 KV cache fits
beside it, with macOS's default GPU wired limit and with it raised) and the tok/s memory
bandwidth alone allows on each chip (an upper bound: real generation is slower). These
are the same functions (tierquant.plan.footprint) the benchmark stage's fit and
bandwidth tables and `budget.fit` use.

    python bench/mac.py                                # seed recipe, both models
    python bench/mac.py --model gpt-oss-120b recipe=mixed_3_6
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.headers import real_spec  # noqa: E402
from tierquant.config import compose, validate  # noqa: E402
from tierquant.core.checkpoint import TensorSpec  # noqa: E402
from tierquant.core.gptoss import GptOssShape, hf_tensor_specs, mlx_weights  # noqa: E402
from tierquant.plan import footprint  # noqa: E402
from tierquant.plan.recipe import assign  # noqa: E402
from tierquant.plan.size import GIB  # noqa: E402
from tierquant.source.synthetic import config_json  # noqa: E402

CONTEXTS = (1024, 4096)
GENERATED = 128


def recipe_tensors(config, shape: GptOssShape) -> list[TensorSpec]:
    """The stored tensors (byte counts, mlx-lm names) of `config`'s recipe and tiers."""
    precisions = config.precisions()
    tiers = assign(mlx_weights(shape), config.recipe, shape.num_hidden_layers)
    tier_of = {w.name: tier for tier, weights in tiers.items() for w in weights}
    specs = []
    for w in mlx_weights(shape):
        nbytes = Fraction(w.numel) * precisions[tier_of[w.name]].weight_bits(w.kind) / 8
        rows = w.shape[0]  # rows kept: the embedding is read one row per token
        specs.append(TensorSpec(w.name, "U8", (rows, int(nbytes) // rows)))
    return specs


def report(model: str, overrides: list[str]) -> None:
    config = validate(compose([f"model={model}", *overrides]))
    hf_config = config_json(real_spec(model))
    shape = GptOssShape.from_config(hf_config)
    max_positions = hf_config["max_position_embeddings"]
    memory = footprint.MemoryModel(**vars(config.memory))
    chips = dict(config.benchmark.chips)
    variants = {
        f"{config.recipe.name} recipe": recipe_tensors(config, shape),
        "original": hf_tensor_specs(shape),
    }
    print(f"\n## {model} (predicted from its shapes, not measured)\n")
    fits, bounds = {}, {}
    for name, tensors in variants.items():
        stored = footprint.stored_bytes(tensors)["total"]
        bpw = 8 * stored / footprint.weight_count(shape)
        per_token = footprint.bytes_per_token(tensors, shape)
        print(
            f"- {name}: {stored:,} bytes ({stored / GIB:.2f} GiB), {bpw:.3f} bits/weight; "
            f"{per_token['total'] / 1e9:.3f} GB of weights read per generated token"
        )
        fits[name] = footprint.fit_table(stored, shape, max_positions, memory)["sizes"]
        bounds[name] = footprint.bandwidth_table(per_token, shape, CONTEXTS, GENERATED, chips)
    rules = footprint.WIRED_LIMITS
    print("\nLongest context that fits (0: the model does not fit), by GPU wired limit:\n")
    head = [f"{name}, {rule} limit" for name in variants for rule in rules]
    print("| unified memory | GPU limit: default / raised | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(head))
    for size in memory.memory_gib:
        row = fits[next(iter(variants))][str(size)]
        limits = " / ".join(f"{row[f'gpu_limit_gib_{r}']:g}" for r in rules)
        cells = [f"{fits[n][str(size)][f'max_context_{r}']:,}" for n in variants for r in rules]
        print(f"| {size} GiB | {limits} GiB | " + " | ".join(cells) + " |")
    print("\nUpper bound on generation tok/s from memory bandwidth alone (prompt of N tokens):\n")
    head = [f"{name}, {c}" for name in variants for c in CONTEXTS]
    print("| chip | GB/s | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(head))
    for chip, gbps in chips.items():
        cells = [
            f"{bounds[n]['contexts'][str(c)]['bound_tps'][chip]:.0f}"
            for n in variants
            for c in CONTEXTS
        ]
        print(f"| {chip} | {gbps:g} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", nargs="+", default=["gpt-oss-120b", "gpt-oss-20b"], help="conf/model entries"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. recipe=mixed_3_6")
    args = parser.parse_args()
    print(f"memory model: {footprint.fit_rule(footprint.MemoryModel())}")
    for model in args.model:
        report(model, args.overrides)


if __name__ == "__main__":
    main()
