"""GPTQ at gpt-oss-120b widths: tierquant.core.gptq against numpy's GEMM rate and mlx-lm's GPTQ.

For each matrix (default: expert gate_up (5760, 2880), expert down (2880, 2880), attention
q (4096, 2880)) a random bf16 weight and a random correlated Hessian with outlier
channels (H = D (BᵀB + 0.1·I) D, B (512, in), D = 1 but 20 on 1% of channels; seeded, so
every worker builds the same ones) are made, then, each in a fresh process (its own
peak RSS, sampled by bench/common.run_measured):

  ours      tierquant.core.gptq.gptq_quantize at each --bits (default 3 and 4): time,
            FLOPs counted analytically (gptq_flops), GFLOP/s and its share of numpy's
            float32 GEMM rate (2048², measured in the same run, in a worker with the
            same environment), per wall second and per CPU second of the worker (on
            shared cores the CPU figures are the steadier ones)
  mlx-lm    mlx_lm.quant.gptq.gptq_quantize (mlx-lm supports 2/4/8 bits) on a model of
            that one nn.Linear, at 4 bits: its per-matrix loop is not separable from
            the model walk, so its own function runs unchanged, with only the Hessian
            capture (`Catcher`) replaced by one holding our Hessian (no forward pass)
  rtn       mx.quantize of the bf16 weight

and the objective tr((W − Ŵ) H (W − Ŵ)ᵀ) (= ‖X (W − Ŵ)ᵀ‖² on inputs with Σ XᵀX = H) of
each, Ŵ as mx.dequantize gives it. Prints a table; ours/mlx-lm is the time ratio at 4 bits.

    nice -n 10 python bench/gptq.py                        # ~10 min on 2 busy cores
    nice -n 10 python bench/gptq.py --shapes down=2880x2880 --bits 4
    nice -n 10 python bench/gptq.py --few-tokens           # the few-routed-tokens experiment

--few-tokens: an expert of in=128 sees N ∈ {4, 16, 64, 256} routed tokens; held-out
objective of GPTQ with its own damped Hessian, with blends α·Ĥ_expert + (1 − α)·Ĥ_pooled
(Ĥ: Hessians per token; pooled: 8192 tokens of all experts), and RTN.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from common import gb, run_measured

DEFAULT_SHAPES = ["gate_up=5760x2880", "down=2880x2880", "q=4096x2880"]
GROUP = 64
MLX_LM_BITS = (2, 4, 8)


def parse_shape(text: str) -> tuple[str, int, int]:
    """`name=OUTxIN` -> (name, out, in)."""
    name, dims = text.split("=")
    out, width = dims.lower().split("x")
    return name, int(out), int(width)


def make_case(out: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bf16-representable float32 weight (out, in), float64 Hessian (in, in)), seeded."""
    from tierquant.core.mxfp4 import from_bf16_bits, to_bf16_bits

    rng = np.random.default_rng(seed)
    w = from_bf16_bits(to_bf16_bits(rng.standard_t(5, (out, width)).astype(np.float32) * 0.02))
    b = rng.standard_normal((512, width)).astype(np.float32)
    h = (b.T @ b).astype(np.float64)
    h[np.diag_indices(width)] += 0.1 * np.mean(np.diag(h))
    d = np.ones(width)
    d[rng.choice(width, max(1, width // 100), replace=False)] = 20.0
    return w, h * d[:, None] * d[None, :]


def gemm_rate(dtype: type[np.floating], n: int = 2048, repeats: int = 3) -> tuple[float, float]:
    """numpy's n x n GEMM rate: (GFLOP per wall second, GFLOP per CPU second of this
    process), best of `repeats` each. On shared cores the CPU rate is the steadier one."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    a @ b
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / cpu / 1e9


def objective_of(w: np.ndarray, h: np.ndarray, parts: tuple, bits: int) -> float:
    """tr(E H Eᵀ) with Ŵ = stock mx.dequantize of numpy (packed, scale bits, bias bits)."""
    import mlx.core as mx

    from tierquant.core.gptq import hessian_objective

    q, s, b = (mx.array(p) for p in parts)
    w_hat = mx.dequantize(q, s.view(mx.bfloat16), b.view(mx.bfloat16), group_size=GROUP, bits=bits)
    return hessian_objective(w, np.array(w_hat.astype(mx.float32)), h)


def run_ours(w: np.ndarray, h: np.ndarray, bits: int) -> dict:
    from tierquant.core.gptq import gptq_quantize

    t0, c0 = time.perf_counter(), time.process_time()
    parts = gptq_quantize(w, h, bits=bits, group_size=GROUP)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu": cpu, "objective": objective_of(w, h, parts, bits)}


def run_rtn(w: np.ndarray, h: np.ndarray, bits: int) -> dict:
    import mlx.core as mx

    t0, c0 = time.perf_counter(), time.process_time()
    q, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=GROUP, bits=bits)
    mx.eval(q, s, b)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    parts = (np.array(q), np.array(s.view(mx.uint16)), np.array(b.view(mx.uint16)))
    return {"seconds": seconds, "cpu": cpu, "objective": objective_of(w, h, parts, bits)}


def run_mlx_lm(w: np.ndarray, h: np.ndarray, bits: int) -> dict:
    """mlx-lm's gptq_quantize on a one-Linear model, its Catcher holding our Hessian."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.quant import gptq as mlx_gptq

    hessian = mx.array(h.astype(np.float32))

    class GivenHessian(mlx_gptq.Catcher):
        def __init__(self, module: nn.Module) -> None:
            super().__init__(module)
            self.H = hessian

    class OneLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(w.shape[1], w.shape[0], bias=False)

        def __call__(self, x: mx.array) -> mx.array:
            return self.proj(x)

    model = OneLinear()
    model.proj.weight = mx.array(w).astype(mx.bfloat16)
    mx.eval(model.parameters())
    mlx_gptq.Catcher = GivenHessian  # what its Hessian pass would have accumulated
    t0, c0 = time.perf_counter(), time.process_time()
    model, _ = mlx_gptq.gptq_quantize(model, [], bits, GROUP, bits, GROUP)
    layer = model.proj
    mx.eval(layer.parameters())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    parts = (
        np.array(layer.weight),
        np.array(layer.scales.view(mx.uint16)),
        np.array(layer.biases.view(mx.uint16)),
    )
    return {"seconds": seconds, "cpu": cpu, "objective": objective_of(w, h, parts, bits)}


def worker(method: str, shape: str, bits: int, seed: int, case: str | None = None) -> None:
    """One measurement in this process; prints a JSON line. `case`: an .npz holding the
    weight `w` (float32, bf16-representable) and Hessian `h` to use instead of random ones
    (bench/gptq_wide.py: real Hessians of the wide model)."""
    if method == "gemm":  # in the workers' environment (OPENBLAS_NUM_THREADS)
        rates = {"float32": gemm_rate(np.float32), "float64": gemm_rate(np.float64)}
        print("RESULT " + json.dumps(rates), flush=True)
        return
    if case is not None:
        with np.load(case) as data:
            w, h = data["w"], data["h"]
    else:
        _, out, width = parse_shape(shape)
        w, h = make_case(out, width, seed)
    runs = {"ours": run_ours, "rtn": run_rtn, "mlx-lm": run_mlx_lm}
    result = runs[method](w, h, bits)
    print("RESULT " + json.dumps(result), flush=True)


def measure(
    method: str, shape: str, bits: int, seed: int, env: dict[str, str], case: Path | None = None
) -> dict:
    """`worker` in a fresh process (with `env`): its result, wall time and peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, shape, str(bits)]
    if case is not None:
        cmd += ["--case", str(case)]
    m = run_measured([*cmd, "--seed", str(seed)], env=env)
    line = next(x for x in m.output.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT ") :]), "peak_rss": m.peak_rss}


def fmt(value: float | str, width: int, digits: int) -> str:
    """`value` in `width` columns with `digits` decimals, or blanks for ""."""
    return f"{value:{width}.{digits}f}" if value != "" else " " * width


def bench(shapes: list[str], bits_list: list[int], skip_mlx_lm: bool, threads: int | None) -> None:
    """The table: every shape at every bits, ours vs rtn (vs mlx-lm where it can)."""
    from tierquant.core.gptq import gptq_flops

    env = {} if threads is None else {"OPENBLAS_NUM_THREADS": str(threads)}

    rates = measure("gemm", "gemm=0x0", 0, 0, env)
    (rate32, cpu32), (rate64, cpu64) = rates["float32"], rates["float64"]
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}")
    print(
        f"numpy GEMM (2048², best of 3): float32 {rate32:.1f} GFLOP/s ({cpu32:.1f} per CPU "
        f"second), float64 {rate64:.1f} ({cpu64:.1f})"
    )
    print(f"workers' OPENBLAS_NUM_THREADS: {threads or 'unset (one per core)'}")
    print(f"group size {GROUP}; codes='stored'; objective tr((W−Ŵ)H(W−Ŵ)ᵀ) relative to RTN")
    head = (
        f"{'matrix':>8} {'shape':>11} {'bits':>4} {'method':>7} {'time s':>7} {'CPU s':>6} "
        f"{'GFLOP':>6} {'GFLOP/s':>7} {'/GEMM32':>7} {'/CPU-s':>6} {'/GEMM':>5} "
        f"{'peak RSS':>9} {'objective':>10} {'vs RTN':>6}"
    )
    print(head)
    print("-" * len(head))
    for seed, shape in enumerate(shapes):
        name, out, width = parse_shape(shape)
        flops = gptq_flops(out, width) / 1e9
        for bits in bits_list:
            methods = ["rtn", "ours"]
            if bits in MLX_LM_BITS and not skip_mlx_lm:
                methods.append("mlx-lm")
            results = {m: measure(m, shape, bits, seed, env) for m in methods}
            rtn = results["rtn"]["objective"]
            for m, r in results.items():
                rate = share = cpu_rate = cpu_share = ""
                if m != "rtn":
                    rate, share = flops / r["seconds"], flops / r["seconds"] / rate32
                    cpu_rate, cpu_share = flops / r["cpu"], flops / r["cpu"] / cpu32
                print(
                    f"{name:>8} {out:>5}x{width:<5} {bits:>4} {m:>7} {r['seconds']:7.2f} "
                    f"{r['cpu']:6.1f} {flops if m != 'rtn' else 0:6.1f} {fmt(rate, 7, 1)} "
                    f"{fmt(share, 7, 2)} {fmt(cpu_rate, 6, 1)} {fmt(cpu_share, 5, 2)} "
                    f"{gb(r['peak_rss']):>9} "
                    f"{r['objective']:10.4g} {r['objective'] / rtn:6.3f}",
                    flush=True,
                )
            if "mlx-lm" in results:
                ours, theirs = results["ours"], results["mlx-lm"]
                print(
                    f"{'':>8} ours/mlx-lm at {bits} bits: time "
                    f"{ours['seconds'] / theirs['seconds']:.3f}, CPU "
                    f"{ours['cpu'] / theirs['cpu']:.3f} (target ≤ 1.0)"
                )


def expert_inputs(
    rng: np.random.Generator,
    tokens: int,
    basis: np.ndarray,
    shift: np.ndarray,
    spread: np.ndarray,
    outlier: float,
) -> np.ndarray:
    """Tokens of one expert: latent shift + spread·noise mixed by the shared `basis`,
    plus channel noise; the first 2 channels scaled by `outlier` for every expert."""
    z = shift + spread * rng.standard_normal((tokens, basis.shape[0]))
    x = z @ basis + 0.3 * rng.standard_normal((tokens, basis.shape[1]))
    x[:, :2] *= outlier
    return x


def few_tokens(
    bits: int, outlier: float, experts: int = 8, width: int = 128, out: int = 256
) -> None:
    """Held-out objective / RTN's (geometric mean over `experts`) for an expert that saw
    N tokens: GPTQ on its own damped Hessian, on blends with the pooled one, pooled only."""
    import mlx.core as mx

    from tierquant.core.gptq import dequantize, gptq_quantize, objective
    from tierquant.core.mxfp4 import from_bf16_bits, to_bf16_bits

    rng = np.random.default_rng(0)
    basis = rng.standard_normal((32, width))
    params = [(rng.standard_normal(32) * 1.5, rng.uniform(0.3, 1.0, 32)) for _ in range(experts)]
    pooled = [expert_inputs(rng, 8192 // experts, basis, *p, outlier) for p in params]
    pooled = np.concatenate(pooled)
    h_pooled = pooled.T @ pooled / len(pooled)
    counts = (4, 16, 64, 256)
    labels = ["own", "α=N/(N+in)", "α=0.5", "α=0.1", "pooled"]
    ratios = {(n, k): [] for n in counts for k in labels}
    for e, p in enumerate(params):
        w = rng.standard_t(5, (out, width)).astype(np.float32) * 0.02
        w = from_bf16_bits(to_bf16_bits(w))
        held = expert_inputs(rng, 4096, basis, *p, outlier)
        q, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=GROUP, bits=bits)
        w_rtn = np.array(mx.dequantize(q, s, b, group_size=GROUP, bits=bits).astype(mx.float32))
        rtn = objective(w, w_rtn, held)
        for n in counts:
            x = expert_inputs(np.random.default_rng(1000 * e + n), n, basis, *p, outlier)
            h_own = x.T @ x / n
            blends = {"own": 1.0, "α=N/(N+in)": n / (n + width), "α=0.5": 0.5, "α=0.1": 0.1}
            for label in labels:
                alpha = blends.get(label, 0.0)
                h = alpha * h_own + (1 - alpha) * h_pooled
                parts = gptq_quantize(w, h, bits=bits, group_size=GROUP)
                w_hat = dequantize(*parts, bits=bits, group_size=GROUP)
                ratios[n, label].append(objective(w, w_hat, held) / rtn)
    print(
        f"few routed tokens: in={width}, out={out}, {bits}-bit g{GROUP}, {experts} experts, "
        f"2 outlier channels x{outlier:g};"
    )
    print("held-out objective / RTN's (geometric mean; < 1 beats RTN), pooled = 8192 tokens")
    print(f"{'N':>5} " + " ".join(f"{k:>11}" for k in labels))
    for n in counts:
        cells = [float(np.exp(np.mean(np.log(ratios[n, k])))) for k in labels]
        print(f"{n:>5} " + " ".join(f"{c:11.3f}" for c in cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="name=OUTxIN ...")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--skip-mlx-lm", action="store_true", help="do not run mlx-lm's GPTQ")
    p.add_argument("--few-tokens", action="store_true", help="run the few-tokens experiment")
    p.add_argument(
        "--blas-threads", type=int, default=None, help="OPENBLAS_NUM_THREADS for the workers"
    )
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "SHAPE", "BITS"), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        method, shape, bits = args.worker
        worker(method, shape, int(bits), args.seed, args.case)
    elif args.few_tokens:
        for outlier in (20.0, 1.0):
            for bits in args.bits:
                few_tokens(bits, outlier)
    else:
        bench(args.shapes, args.bits, args.skip_mlx_lm, args.blas_threads)


if __name__ == "__main__":
    main()
