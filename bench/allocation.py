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
import dataclasses
import json
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

from tierquant.check.validate import QualityGate
from tierquant.config import compose, validate
from tierquant.core.files import read_json
from tierquant.pipeline import paths_under, run_stages
from tierquant.plan.planfile import read_allocation

HAND = {"seed": [], "mixed_3_6": ["recipe=mixed_3_6"]}


# under --work, shared by every run
SHARED = ("original", "float", "reference", "calibration", "measure", "measure_plot")


def build(root: Path, overrides: list[str], name: str) -> dict:
    """One run under root/runs/<name> through the stages' own code (tierquant.pipeline),
    sharing root's original, reference and measure; gated by nothing (QualityGate())."""
    shared = paths_under(validate(compose(overrides)), root)
    keep = {k: Path(getattr(shared.paths, k)) for k in SHARED}
    cfg = paths_under(shared, root / "runs" / name, **keep)
    cfg = dataclasses.replace(cfg, validate=QualityGate())
    run_stages(cfg, ["plan", "predict", "quantize", "assemble", "validate"])
    d = root / "runs" / name
    for folder in ("quantized", "model"):  # disk: at wide widths each run is GBs
        shutil.rmtree(d / folder)
    m = read_json(Path(cfg.paths.validate))
    size = read_json(Path(cfg.paths.predict))
    alloc = read_allocation(Path(cfg.paths.plan))
    return {
        "run": name,
        "bits_per_weight": m["bits_per_weight"],
        "predicted_bpw": size["total"]["bits_per_weight"],
        "kld_mean": round(m["kld_mean"], 4),
        "top1_agreement": round(m["top1_agreement"], 4),
        "ppl_ratio": round(m["ppl_ratio"], 4),
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
    root = args.work
    cfg = paths_under(validate(compose(args.overrides)), root)
    if not (root / "float").is_dir():
        run_stages(cfg, ["download", "convert"])
    if not (root / "reference").is_dir():
        run_stages(cfg, ["reference"])
    t = time.perf_counter()
    if (root / "measure" / "damage.json").is_file():  # a rerun: measure's inputs unchanged
        print("measure: reused", root / "measure", flush=True)
    else:
        run_stages(cfg, ["calibration", "measure"])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(
            f"measure: {time.perf_counter() - t:.0f} s "
            f"(process peak RSS so far {peak / 1e9:.2f} GB)",
            flush=True,
        )
    rows = []
    for name in args.recipes.split(","):
        ov = HAND[name]
        hand = build(root, [*args.overrides, *ov], name)
        bpw = hand["predicted_bpw"]
        auto = build(
            root,
            [*args.overrides, "recipe=auto", f"budget.bits_per_weight={bpw}"],
            f"auto@{name}",
        )
        rows += [hand, auto]
        for r in (hand, auto):
            print(json.dumps(r), flush=True)
    print("| run | bits/weight | kld_mean | top-1 | PPL ratio | predicted damage |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        pred = "—" if r["predicted_damage"] is None else r["predicted_damage"]
        print(
            f"| {r['run']} | {r['bits_per_weight']:.4f} | {r['kld_mean']} | "
            f"{r['top1_agreement']} | {r['ppl_ratio']} | {pred} |"
        )


if __name__ == "__main__":
    sys.exit(main())
