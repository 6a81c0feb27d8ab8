"""recipe=auto against the hand recipes at equal size, on the tiny model (in-process,
the library functions the stages call): measure → for seed and mixed_3_6, their plan and
bits per weight, then recipe=auto at that budget; each model quantized, assembled and
validated against the same reference. Prints bpw, kld_mean, top-1, and auto's predicted
damage (the sum of its groups' measured damage) beside the measured kld_mean.

    python bench/allocation.py [--work DIR] [--recipes seed,mixed_3_6] [key=value ...]
    # e.g. calibration.num_windows=8; a rerun in the same DIR reuses its measure
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

from tierquant.assemble import assemble_model
from tierquant.autoplan import auto_plan
from tierquant.config import ValidateConfig, compose, validate
from tierquant.convert import convert_checkpoint
from tierquant.download import write_local_checkpoint
from tierquant.evaluate import build_reference
from tierquant.measure import measure
from tierquant.plan import plan, read_plan
from tierquant.predict import predict
from tierquant.quantize import quantize_tier
from tierquant.validate import validate_model

HAND = {"seed": [], "mixed_3_6": ["recipe=mixed_3_6"]}


def build(root: Path, work: Path, overrides: list[str], name: str) -> dict:
    d = work / "runs" / name
    cfg = validate(compose(overrides))
    orig, flt = root / "original", root / "float"
    tiers = cfg.precisions()
    alloc = None
    if cfg.recipe.allocate:
        alloc = auto_plan(
            original=orig,
            measure_dir=root / "measure",
            budget=cfg.budget,
            bench=cfg.benchmark,
            group_size=cfg.quant.group_size,
            out=d / "plan",
        )
    else:
        plan(original=orig, recipe=cfg.recipe, out=d / "plan")
    size = predict(
        plan_dir=d / "plan",
        original=orig,
        tiers=cfg.tiers,
        group_size=cfg.quant.group_size,
        out=d / "predicted.json",
    )
    for tier, p in tiers.items():
        quantize_tier(
            tier=tier,
            tensor_names=[t["name"] for t in read_plan(d / "plan", tier)["tensors"]],
            precision=p,
            original_dir=orig,
            out_dir=d / "quantized" / tier,
            max_shard_bytes=cfg.model.max_shard_bytes,
        )
    assemble_model(
        tiers=tiers,
        quantized_dir=d / "quantized",
        float_dir=flt,
        original_dir=orig,
        out_dir=d / "model",
        size_metrics=d / "size.json",
        error_plot=d / "quant_error.csv",
    )
    m = validate_model(
        model_dir=d / "model",
        reference_dir=root / "reference",
        plan_dir=d / "plan",
        original_dir=orig,
        quantized_dir=d / "quantized",
        tiers=tiers,
        thresholds=ValidateConfig(),
        metrics_path=d / "validate.json",
    )
    for folder in ("quantized", "model"):  # disk: at wide widths each run is GBs
        shutil.rmtree(d / folder)
    return {
        "run": name,
        "bits_per_weight": m["bits_per_weight"],
        "predicted_bpw": size["total"]["bits_per_weight"],
        "kld_mean": round(m["kld_mean"], 4),
        "top1_agreement": round(m["top1_agreement"], 4),
        "predicted_damage": None if alloc is None else round(alloc["predicted_damage"], 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("bench/out/allocation"))
    ap.add_argument(
        "--recipes",
        default=",".join(HAND),
        help=f"comma-separated hand recipes to compare against (default: {','.join(HAND)})",
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    unknown = set(args.recipes.split(",")) - set(HAND)
    if unknown:
        ap.error(f"--recipes: unknown {sorted(unknown)}; choose from {list(HAND)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = validate(compose(args.overrides))
    root = args.work
    if not (root / "float").is_dir():
        (root / "original").mkdir(parents=True, exist_ok=True)
        write_local_checkpoint(root / "original", cfg.model.synthetic)
        convert_checkpoint(
            root / "original", root / "float", max_shard_bytes=cfg.model.max_shard_bytes
        )
    if not (root / "reference").is_dir():
        build_reference(original=root / "original", out=root / "reference", eval_config=cfg.eval)
    t = time.perf_counter()
    if (root / "measure" / "damage.json").is_file():  # a rerun: measure's inputs unchanged
        print("measure: reused", root / "measure", flush=True)
    else:
        measure(
            original=root / "original",
            calibration=cfg.calibration,
            eval_config=cfg.eval,
            candidates=list(cfg.measure.candidates),
            group_size=cfg.quant.group_size,
            out=root / "measure",
            plot=root / "measure_damage.csv",
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(
            f"measure: {time.perf_counter() - t:.0f} s "
            f"(process peak RSS so far {peak / 1e9:.2f} GB)",
            flush=True,
        )
    rows = []
    for name in args.recipes.split(","):
        ov = HAND[name]
        hand = build(root, root, [*args.overrides, *ov], name)
        bpw = hand["predicted_bpw"]
        auto = build(
            root,
            root,
            [*args.overrides, "recipe=auto", f"budget.bits_per_weight={bpw}"],
            f"auto@{name}",
        )
        rows += [hand, auto]
        for r in (hand, auto):
            print(json.dumps(r), flush=True)
    print("| run | bits/weight | kld_mean | top-1 | predicted damage |")
    print("|---|---|---|---|---|")
    for r in rows:
        pred = "—" if r["predicted_damage"] is None else r["predicted_damage"]
        print(
            f"| {r['run']} | {r['bits_per_weight']:.4f} | {r['kld_mean']} | "
            f"{r['top1_agreement']} | {pred} |"
        )


if __name__ == "__main__":
    sys.exit(main())
