"""What an expert with few routed tokens should get, measured on the tiny model.

For every expert matrix (gate/up/down of every expert of every layer) of a checkpoint
(default: the pipeline's data/original, the trained tiny model), GPTQ at the seed's
expert precision (3 bits, g64) on Hessians from the calibration windows with several
weights α of the expert's own per-token Hessian against the layer's pooled one
(tierquant.quality.hessian.LayerInputs.hessian): α = 1 (own only; pooled when the expert
saw no token), the rule N/(N + in), 0.5, 0 (pooled only). Scored by the objective
‖X (W − Ŵ)ᵀ‖² on HELD-OUT inputs (the eval windows' tokens routed to that expert, by
the original), over round-to-nearest's; geometric mean per bucket of N (the calibration
tokens routed to the expert).

    python bench/gptq_experts.py [--original data/original] [--bits 3] [override ...]
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from tierquant.config import compose, validate
from tierquant.core.checkpoint import Checkpoint
from tierquant.core.floatrows import read_expert_bf16
from tierquant.core.gptoss import mlx_weights, shape_of_checkpoint
from tierquant.core.gptq import dequantize, gptq_quantize, objective, rtn_quantize
from tierquant.core.mxfp4 import from_bf16_bits
from tierquant.quality.calibration import calibration_windows
from tierquant.quality.evalset import eval_windows
from tierquant.quality.hessian import LayerInputs

VARIANTS = {"own": 1.0, "N/(N+in)": None, "0.5": 0.5, "pooled": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, default=Path("data/original"))
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. calibration.num_windows=16"
    )
    args = parser.parse_args()
    cfg = validate(compose(args.overrides))
    cal = calibration_windows(cfg.calibration, cfg.eval, args.original)
    held = eval_windows(cfg.eval, args.original)
    shape = shape_of_checkpoint(args.original)
    experts = [w for w in mlx_weights(shape) if w.kind in ("gate_proj", "up_proj", "down_proj")]
    layers = set(range(shape.num_hidden_layers))
    bs = cfg.calibration.batch_size
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    with Checkpoint(args.original) as original:
        streams = zip(
            LayerInputs.stream(args.original, cal, batch_size=bs, layers=layers),
            LayerInputs.stream(args.original, held, batch_size=bs, layers=layers),
            strict=True,
        )
        for c, h in streams:
            for w in (w for w in experts if w.layer == c.layer):
                rows = h.experts if w.kind != "down_proj" else h.down_proj
                width = w.shape[2]
                for e in range(w.shape[0]):
                    x = rows[h.expert_ids == e]
                    n = c.routed(e)
                    bucket = (
                        f"N < {width // 4}"
                        if n < width // 4
                        else f"{width // 4} <= N < {width}"
                        if n < width
                        else f"N >= {width}"
                    )
                    weight = from_bf16_bits(read_expert_bf16(original, w, e, e + 1)[0])
                    kw = {"bits": args.bits, "group_size": args.group_size}
                    rtn = objective(weight, dequantize(*rtn_quantize(weight, **kw), **kw), x)
                    if rtn == 0:
                        continue
                    counts[bucket] += 1
                    for name, alpha in VARIANTS.items():
                        hess = c.hessian(w.kind, e, alpha=alpha)
                        q = gptq_quantize(weight, hess, **kw)
                        ratios[(bucket, name)].append(
                            objective(weight, dequantize(*q, **kw), x) / rtn
                        )
    print(
        f"experts of {args.original} ({shape.num_hidden_layers} layers x "
        f"{shape.num_local_experts} experts x gate/up/down), {args.bits}-bit g{args.group_size}; "
        f"calibration {cal.shape[0]}x{cal.shape[1]} tokens, "
        f"held-out {held.shape[0]}x{held.shape[1]}"
    )
    print("held-out objective / RTN's (geometric mean over expert matrices; < 1 beats RTN)")
    print(f"{'bucket':>18} {'matrices':>8} " + " ".join(f"{n:>9}" for n in VARIANTS))
    for bucket in sorted(counts, key=lambda b: (not b.startswith("N <"), "<=" not in b)):
        cells = [math.exp(np.mean(np.log(ratios[(bucket, n)]))) for n in VARIANTS]
        print(f"{bucket:>18} {counts[bucket]:>8} " + " ".join(f"{v:>9.3f}" for v in cells))
    every = [
        math.exp(np.mean(np.log([r for (_, n), rs in ratios.items() if n == v for r in rs])))
        for v in VARIANTS
    ]
    print(f"{'all':>18} {sum(counts.values()):>8} " + " ".join(f"{v:>9.3f}" for v in every))


if __name__ == "__main__":
    main()
