"""Benchmark MXFP4 -> bf16 decoding: tierquant.core.mxfp4 vs mx.dequantize vs a naive numpy lookup.

All three decode the same random input (default: 4 experts of gpt-oss-120b gate_up, blocks
[5760, 90, 16]) and are checked to agree bit for bit; throughput is GB/s of bf16 output,
best of --repeats.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from tierquant.core.mxfp4 import FP4_VALUES, default_threads, dequantize_to_bf16_bits


def naive_numpy(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Straightforward numpy: nibble split, float32 table lookup, ldexp, truncate to bf16."""
    lut = np.asarray(FP4_VALUES, dtype=np.float32)
    lo = lut[blocks & 0x0F]
    hi = lut[blocks >> 4]
    vals = np.stack([lo, hi], axis=-1).reshape(*scales.shape, 32)
    vals = np.ldexp(vals, scales.astype(np.int32)[..., None] - 127)
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16)
    return bits.reshape(*scales.shape[:-1], scales.shape[-1] * 32)


def mx_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """mx.dequantize(mode="mxfp4") to bf16, returned as uint16 bits in numpy."""
    import mlx.core as mx

    w = mx.array(blocks).view(mx.uint32).flatten(-2)
    out = mx.dequantize(w, mx.array(scales), group_size=32, bits=4, mode="mxfp4", dtype=mx.bfloat16)
    return np.array(out.view(mx.uint16))


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of fn over repeats calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    """Parse args, run each decoder, print GB/s and ratios."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--experts", type=int, default=4, help="leading experts (default 4)")
    p.add_argument("--rows", type=int, default=5760, help="output rows per expert (5760)")
    p.add_argument("--groups", type=int, default=90, help="32-value groups per row (90)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, best kept (5)")
    p.add_argument("--threads", type=int, default=None, help="threads for ours (CPU count)")
    p.add_argument("--skip-mx", action="store_true", help="do not time mx.dequantize")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    shape = (args.experts, args.rows, args.groups)
    blocks = rng.integers(0, 256, (*shape, 16), dtype=np.uint8)
    scales = rng.integers(100, 140, shape, dtype=np.uint8)
    out = np.empty((*shape[:-1], args.groups * 32), dtype=np.uint16)
    out_gb = out.nbytes / 1e9
    threads = args.threads if args.threads is not None else default_threads()
    print(
        f"input blocks {blocks.shape} ({blocks.nbytes / 1e6:.0f} MB) -> bf16 {out.shape} "
        f"({out_gb:.2f} GB); ours uses {threads} thread(s); best of {args.repeats}"
    )

    def ours() -> np.ndarray:
        return dequantize_to_bf16_bits(blocks, scales, out=out, threads=args.threads)

    def ours_alloc() -> np.ndarray:
        return dequantize_to_bf16_bits(blocks, scales, threads=args.threads)

    candidates: dict[str, Callable[[], np.ndarray]] = {
        "ours (out=)": ours,
        "ours (alloc)": ours_alloc,
        "ours (1 thread)": lambda: dequantize_to_bf16_bits(blocks, scales, out=out, threads=1),
        "naive numpy": lambda: naive_numpy(blocks, scales),
    }
    if not args.skip_mx:
        candidates["mx.dequantize"] = lambda: mx_dequantize(blocks, scales)

    reference = ours().copy()
    rates: dict[str, float] = {}
    for label, fn in candidates.items():
        if not np.array_equal(fn(), reference):
            raise SystemExit(f"{label} disagrees with ours")
        rates[label] = out_gb / best_time(fn, args.repeats)
        print(f"{label:18s} {rates[label]:7.2f} GB/s of bf16 output")
    ref = rates["ours (out=)"]
    for label in ("mx.dequantize", "naive numpy"):
        if label in rates:
            print(f"ours/{label:<13s} {ref / rates[label]:7.1f}x")


if __name__ == "__main__":
    main()
