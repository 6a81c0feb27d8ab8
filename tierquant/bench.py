"""benchmark stage: speed and memory of a model on this machine, and what they should be.

Measured (`run_benchmark`), with mlx-lm's own `load` and `stream_generate` (the code
`mlx_lm.benchmark` runs; EOS is disabled so every run generates exactly
`generate_tokens`): for each prompt length in `benchmark.contexts`, `warmup` untimed
runs and `trials` timed ones of a seeded random prompt drawn from the vocab; prefill
tok/s and generation tok/s as mlx-lm reports them (prompt tokens / time to the first
token; generated tokens / time after it), each as median, min, max and relative spread
((max - min) / median); peak memory from MLX's own counter (`mx.get_peak_memory`, reset
before every run: every buffer MLX allocated, weights included) where the backend
keeps one, else the process's peak RSS (never reset, so the peak over the whole run);
load time (`mlx_lm.load`, weights evaluated); size on disk; and this machine's memory
read bandwidth (`measure_read_bandwidth`).

Computed from the model's config.json and its tensors' stored bytes (safetensors
headers only, so they work for the original MXFP4 checkpoint, a quantized mlx-lm
directory, or shapes with no data at all):

- `bytes_per_token`: bytes read from memory to generate one token (batch 1). Every
  tensor is read once per token, except: expert tensors (`mlp.experts.*`, weights,
  scales and biases) are read for `num_experts_per_tok` of `num_local_experts` experts
  (k/E of their bytes), and the embedding reads one row. Attention, router, norms and
  lm_head are read whole, at their stored precision. On top, generating at context c
  reads the KV cache (`kv_cache_bytes`) at the mean context of the generated tokens.
- `bandwidth_table`: the tok/s memory bandwidth alone allows (bandwidth / bytes per
  token) for the chips in `benchmark.chips` and this machine; measured / bound is the
  efficiency.
- `fit_table`: for each unified-memory size, whether weights + `overhead_gib` fit in
  what the GPU may use, and the longest context whose KV cache fits beside them.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .checkpoint import Checkpoint, TensorSpec, atomic_output, json_bytes, read_json
from .config import BenchmarkConfig, Config
from .errors import TierquantError
from .gptoss import GptOssShape, Weight, mlx_weights

log = logging.getLogger(__name__)

GIB = 2**30
KV_DTYPE_BYTES = 2  # mlx-lm's KV cache holds keys/values in the activation dtype (bf16)
PARTS = ("experts", "attention", "router", "embed", "lm_head", "norms")
VARIANTS = ("model", "original")
THIS_MACHINE = "this machine"

# Quoted from the seed model card (M2 Max, generation tok/s), NOT measured here: the
# seed's 3.557-bit gpt-oss-120b and the original MXFP4 checkpoint.
SEED_CARD_QUOTE = {
    "source": "seed model card (quoted, not measured by this pipeline)",
    "chip": "M2 Max",
    "generation_tps": {"model": 48.2, "original": 43.9},
}


class TensorLike(Protocol):
    """What the tables need of a tensor: TensorSpec and TensorInfo both qualify."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int: ...


# --- tables from shapes and stored bytes ------------------------------------------------


def part_of(name: str) -> str:
    """Which part of the model a tensor (HF or mlx-lm name) belongs to; see PARTS."""
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.router." in name:
        return "router"
    if ".self_attn." in name:
        return "attention"
    if name.startswith("model.embed_tokens."):
        return "embed"
    if name.startswith("lm_head."):
        return "lm_head"
    return "norms"


def stored_bytes(tensors: Iterable[TensorLike]) -> dict[str, int]:
    """Stored bytes per part, and `total`."""
    out = dict.fromkeys(PARTS, 0)
    for t in tensors:
        out[part_of(t.name)] += t.nbytes
    out["total"] = sum(out.values())
    return out


def bytes_per_token(tensors: Iterable[TensorLike], shape: GptOssShape) -> dict[str, float]:
    """Weight bytes read per generated token, per part and `total` (rule: module doc)."""
    active = shape.num_experts_per_tok / shape.num_local_experts
    out = dict.fromkeys(PARTS, 0.0)
    for t in tensors:
        part = part_of(t.name)
        if part == "experts":
            out[part] += t.nbytes * active
        elif part == "embed":
            out[part] += t.nbytes / (t.shape[0] if t.shape else 1)  # one row
        else:
            out[part] += t.nbytes
    out["total"] = sum(out.values())
    return out


def kv_cache_bytes(shape: GptOssShape, context: int) -> int:
    """KV cache bytes at `context` tokens: full-attention layers hold every token,
    sliding-window layers at most `sliding_window` (mlx-lm's RotatingKVCache)."""
    per_layer_token = 2 * shape.num_key_value_heads * shape.head_dim * KV_DTYPE_BYTES
    full = sum(1 for t in shape.layer_types if t == "full_attention")
    sliding = len(shape.layer_types) - full
    return per_layer_token * (full * context + sliding * min(context, shape.sliding_window))


def max_context(shape: GptOssShape, budget_bytes: float, limit: int) -> int:
    """The longest context (<= limit) whose KV cache fits in budget_bytes; 0 if none."""
    if kv_cache_bytes(shape, 1) > budget_bytes:
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kv_cache_bytes(shape, mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def gpu_limit_gib(memory_gib: float, cfg: BenchmarkConfig) -> float:
    """What macOS lets the GPU wire by default (its recommendedMaxWorkingSetSize):
    `gpu_fraction_small` of memory at or below `small_memory_gib`, else `gpu_fraction`."""
    small = memory_gib <= cfg.small_memory_gib
    return memory_gib * (cfg.gpu_fraction_small if small else cfg.gpu_fraction)


def fit_rule(cfg: BenchmarkConfig) -> str:
    """The fit rule in words, for the metrics and the card."""
    return (
        f"default: the GPU may use {cfg.gpu_fraction:g} of unified memory "
        f"({cfg.gpu_fraction_small:.3g} at {cfg.small_memory_gib:g} GiB and below), "
        "macOS's default wired limit; raised: all but "
        f"{cfg.os_reserve_gib:g} GiB (sudo sysctl iogpu.wired_limit_mb=N). A model fits if "
        f"weights + {cfg.overhead_gib:g} GiB overhead fit; max_context is the longest "
        "context whose bf16 KV cache fits in the rest (capped at max_position_embeddings)"
    )


def fit_table(
    weight_bytes: int, shape: GptOssShape, max_positions: int, cfg: BenchmarkConfig
) -> dict[str, Any]:
    """Per memory size (GiB): fits / max_context under the default and raised limits."""
    need = weight_bytes + cfg.overhead_gib * GIB
    sizes: dict[str, Any] = {}
    for memory in cfg.memory_gib:
        row: dict[str, Any] = {"memory_gib": memory}
        for label, limit in (
            ("default", gpu_limit_gib(memory, cfg)),
            ("raised", memory - cfg.os_reserve_gib),
        ):
            context = max_context(shape, limit * GIB - need, max_positions)
            row[f"gpu_limit_gib_{label}"] = round(limit, 2)
            row[f"fits_{label}"] = context > 0
            row[f"max_context_{label}"] = context
        sizes[str(memory)] = row
    return {
        "rule": fit_rule(cfg),
        "weights_gib": round(weight_bytes / GIB, 3),
        "overhead_gib": cfg.overhead_gib,
        "kv_bytes_at": {str(c): kv_cache_bytes(shape, c) for c in (1024, 4096, max_positions)},
        "sizes": sizes,
    }


def bandwidth_table(
    per_token: Mapping[str, float],
    shape: GptOssShape,
    contexts: Iterable[int],
    generate_tokens: int,
    bandwidths_gbps: Mapping[str, float],
) -> dict[str, Any]:
    """Bytes per generated token and the tok/s each bandwidth (GB/s) alone allows.

    At prompt length c the generated tokens see contexts c..c+g-1; the KV bytes read
    per token are taken at their mean, c + (g - 1) / 2.
    """
    table: dict[str, Any] = {
        "bytes_per_token": {k: round(v) for k, v in per_token.items()},
        "contexts": {},
    }
    for c in contexts:
        kv = kv_cache_bytes(shape, round(c + (generate_tokens - 1) / 2))
        total = per_token["total"] + kv
        table["contexts"][str(c)] = {
            "kv_read_bytes": kv,
            "bytes_per_token": round(total),
            "bound_tps": {
                name: round(gbps * 1e9 / total, 2) for name, gbps in bandwidths_gbps.items()
            },
        }
    return table


def weight_count(shape: GptOssShape) -> int:
    """Parameters of the model (the bf16 checkpoint's element count)."""
    return sum(w.numel for w in mlx_weights(shape))


def precision_specs(
    shape: GptOssShape, bits_of: Callable[[Weight], Fraction | float]
) -> list[TensorSpec]:
    """Stored tensors (as U8 byte counts, mlx-lm names) of the bf16 checkpoint's weights
    at `bits_of(weight)` bits per weight (scales and biases included)."""
    specs = []
    for w in mlx_weights(shape):
        nbytes = Fraction(w.numel) * Fraction(bits_of(w)) / 8
        if nbytes.denominator != 1:
            raise ValueError(f"{w.name}: {bits_of(w)} bits/weight is not a whole number of bytes")
        rows = w.shape[0]
        specs.append(TensorSpec(w.name, "U8", (rows, int(nbytes) // rows)))
    return specs


def recipe_bits(config: Config, shape: GptOssShape) -> Callable[[Weight], Fraction]:
    """bits_of for `precision_specs` from the config's recipe and tiers (tierquant.recipe)."""
    from .recipe import assign

    precisions = config.precisions()
    tier_of = {
        w.name: tier
        for tier, weights in assign(
            mlx_weights(shape), config.recipe, shape.num_hidden_layers
        ).items()
        for w in weights
    }
    return lambda w: precisions[tier_of[w.name]].weight_bits(w.kind)


# --- measurements ----------------------------------------------------------------------


def summarize(values: list[float]) -> dict[str, float]:
    """median, min, max and relative spread ((max - min) / median)."""
    med = statistics.median(values)
    return {
        "median": round(med, 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "spread": round((max(values) - min(values)) / med, 4) if med else 0.0,
    }


def measure_read_bandwidth(mib: int, repeats: int = 5) -> dict[str, Any]:
    """This machine's memory read bandwidth in GB/s.

    Sums a `mib` MiB float32 array (far larger than any cache) with numpy (CPU) and
    with MLX on its default device; bytes read / median time. The faster of the two is
    the machine's figure (MLX's CPU reductions are single-threaded; on a Mac the GPU
    reads fastest).
    """
    import mlx.core as mx

    n = mib * 2**20 // 4
    result: dict[str, Any] = {"probe_mib": mib}

    def timed(run: Callable[[], object]) -> float:
        run()  # warm-up: page the array in, compile the kernel
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return n * 4 / statistics.median(times) / 1e9

    result["numpy_sum_gbps"] = round(timed(np.ones(n, dtype=np.float32).sum), 2)
    device = mx.ones((n,), dtype=mx.float32)
    mx.eval(device)
    result["mlx_sum_gbps"] = round(timed(lambda: mx.eval(mx.sum(device))), 2)
    device = None
    mx.clear_cache()
    best = max(("numpy_sum_gbps", "mlx_sum_gbps"), key=lambda k: result[k])
    result["gbps"] = result[best]
    result["method"] = (
        f"read bandwidth: sum of a {mib} MiB float32 array, best of numpy / mlx ({best})"
    )
    return result


class PeakMemory:
    """Peak memory: MLX's own counter where the backend keeps one, else peak RSS."""

    def __init__(self) -> None:
        import mlx.core as mx

        self.mx = mx
        try:
            mx.reset_peak_memory()
            mx.eval(mx.ones((1024,)))
            works = mx.get_peak_memory() > 0
        except (AttributeError, RuntimeError):
            works = False
        self.source = (
            "mx.get_peak_memory (MLX allocations, reset per run)"
            if works
            else "process peak RSS (resource.getrusage ru_maxrss, whole process lifetime)"
        )
        self.mlx = works

    def reset(self) -> None:
        if self.mlx:
            self.mx.reset_peak_memory()

    def peak(self) -> int:
        if self.mlx:
            return int(self.mx.get_peak_memory())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes; Linux: KiB

    def current(self) -> int:
        return int(self.mx.get_active_memory()) if self.mlx else self.peak()


def check_contexts(model_dir: Path, cfg: BenchmarkConfig) -> tuple[GptOssShape, int]:
    """The model's shape and max_position_embeddings; fails if a context cannot run."""
    if not model_dir.is_dir():
        raise TierquantError(
            f"{model_dir}: model directory does not exist; run the stage that produces it "
            "(`dvc repro` runs it before the benchmark)"
        )
    config_path = model_dir / "config.json"
    config = read_json(config_path)
    shape = GptOssShape.from_config(config, str(config_path))
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or limit < 1:
        raise TierquantError(f"{config_path}: 'max_position_embeddings' must be a positive int")
    for c in cfg.contexts:
        if c + cfg.generate_tokens > limit:
            raise TierquantError(
                f"benchmark.contexts: prompt {c} + benchmark.generate_tokens "
                f"{cfg.generate_tokens} = {c + cfg.generate_tokens} tokens exceeds the model's "
                f"max_position_embeddings {limit} ({config_path}); use shorter contexts"
            )
    return shape, limit


def load_model(model_dir: Path) -> tuple[Any, Any, float]:
    """mlx_lm.load (weights evaluated) -> model, tokenizer, seconds; failures explained."""
    from mlx_lm import load

    t0 = time.perf_counter()
    try:
        model, tokenizer = load(str(model_dir))
    except Exception as e:  # mlx-lm raises many types; the message is what helps
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TierquantError(
            f"{model_dir}: mlx_lm.load failed ({type(e).__name__}: {first}); is it a "
            "complete mlx-lm model directory (config.json, weights, tokenizer)?"
        ) from None
    return model, tokenizer, time.perf_counter() - t0


def prompt_tokens(vocab_size: int, length: int, seed: int) -> list[int]:
    """A deterministic random prompt: `length` ids drawn from [0, vocab_size)."""
    rng = np.random.default_rng([seed, length])
    return rng.integers(0, vocab_size, size=length).tolist()


def time_context(
    model: Any, tokenizer: Any, prompt: list[int], cfg: BenchmarkConfig, memory: PeakMemory
) -> list[dict[str, float]]:
    """`warmup` untimed then `trials` timed runs: prefill/generation tok/s, peak bytes."""
    import mlx.core as mx
    from mlx_lm import stream_generate

    runs = []
    for i in range(cfg.warmup + cfg.trials):
        mx.clear_cache()
        memory.reset()
        last = None
        try:
            for last in stream_generate(  # noqa: B007 - the last response has the totals
                model,
                tokenizer,
                prompt,
                max_tokens=cfg.generate_tokens,
                prefill_step_size=cfg.prefill_step_size,
            ):
                pass
        except (RuntimeError, ValueError, MemoryError) as e:
            raise TierquantError(
                f"benchmark: generation with a {len(prompt)}-token prompt failed "
                f"({type(e).__name__}: {e})"
            ) from None
        if last is None or last.generation_tokens != cfg.generate_tokens:
            got = 0 if last is None else last.generation_tokens
            raise TierquantError(
                f"benchmark: generated {got} tokens, expected {cfg.generate_tokens}"
            )
        if i >= cfg.warmup:
            runs.append(
                {
                    "prefill_tps": last.prompt_tps,
                    "generation_tps": last.generation_tps,
                    "peak_bytes": memory.peak(),
                }
            )
    return runs


def run_benchmark(
    model_dir: Path, cfg: BenchmarkConfig, machine: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Benchmark the model in `model_dir`: (metrics, plot rows). See the module doc."""
    model_dir = Path(model_dir)
    shape, max_positions = check_contexts(model_dir, cfg)
    with Checkpoint(model_dir) as ckpt:
        tensors = list(ckpt.tensors.values())
    size = stored_bytes(tensors)
    disk = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    per_token = bytes_per_token(tensors, shape)

    memory = PeakMemory()
    memory.reset()
    model, tokenizer, load_s = load_model(model_dir)
    after_load = memory.current()
    tokenizer.eos_token_ids = set()  # as mlx_lm.benchmark: never stop early
    log.info("loaded %s in %.2f s (%.3f GiB in memory)", model_dir, load_s, after_load / GIB)

    speed: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for c in cfg.contexts:
        t0 = time.perf_counter()
        prompt = prompt_tokens(shape.vocab_size, c, cfg.seed)
        runs = time_context(model, tokenizer, prompt, cfg, memory)
        prefill = summarize([r["prefill_tps"] for r in runs])
        generation = summarize([r["generation_tps"] for r in runs])
        peak = max(r["peak_bytes"] for r in runs)
        speed[str(c)] = {
            "prompt_tokens": c,
            "prefill_tps": prefill,
            "generation_tps": generation,
            "peak_memory_gib": round(peak / GIB, 4),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        rows.append(
            {
                "context": c,
                "prefill_tps": prefill["median"],
                "generation_tps": generation["median"],
                "peak_memory_gib": round(peak / GIB, 4),
            }
        )
        log.info(
            "context %d: prefill %.1f tok/s, generation %.1f tok/s (medians of %d), peak %.3f GiB",
            c,
            prefill["median"],
            generation["median"],
            cfg.trials,
            peak / GIB,
        )
    del model
    bandwidth = measure_read_bandwidth(cfg.probe_mib)
    table = bandwidth_table(
        per_token,
        shape,
        cfg.contexts,
        cfg.generate_tokens,
        {**cfg.chips, THIS_MACHINE: bandwidth["gbps"]},
    )
    for c, row in table["contexts"].items():
        bound = row["bound_tps"][THIS_MACHINE]
        row["measured_tps"] = speed[c]["generation_tps"]["median"]
        row["efficiency"] = round(row["measured_tps"] / bound, 4) if bound else math.nan
    table["machine"] = bandwidth

    metrics: dict[str, Any] = {
        "path": str(model_dir),
        "machine": {k: machine.get(k) for k in ("cpu", "backend", "memory_gib", "mlx", "mlx_lm")}
        if machine
        else None,
        "settings": {
            "generate_tokens": cfg.generate_tokens,
            "trials": cfg.trials,
            "warmup": cfg.warmup,
            "prefill_step_size": cfg.prefill_step_size,
        },
        "size": {
            "disk_bytes": disk,
            "tensor_bytes": size["total"],
            "gib": round(size["total"] / GIB, 4),
            "bits_per_weight": round(8 * size["total"] / weight_count(shape), 4),
            "parts_bytes": {k: size[k] for k in PARTS},
        },
        "load_s": round(load_s, 3),
        "memory": {
            "source": memory.source,
            "after_load_gib": round(after_load / GIB, 4),
            "peak_gib": max(s["peak_memory_gib"] for s in speed.values()),
        },
        "speed": speed,
        "bandwidth": table,
        "fit": fit_table(size["total"], shape, max_positions, cfg),
    }
    return metrics, rows


def benchmark_stage(config: Config, variant: str) -> Path:
    """Benchmark `paths.<variant>` (model or original) into `paths.benchmark`."""
    if variant not in VARIANTS:
        raise TierquantError(f"benchmark: variant must be one of {VARIANTS}, got {variant!r}")
    model_dir = Path(getattr(config.paths, variant))
    machine_path = Path(config.paths.machine)
    if not machine_path.is_file():
        raise TierquantError(f"{machine_path}: missing; run the machine stage first")
    t0 = time.perf_counter()
    metrics, rows = run_benchmark(model_dir, config.benchmark, read_json(machine_path))
    metrics = {"variant": variant, **metrics, "seconds": round(time.perf_counter() - t0, 2)}
    rows = [{"variant": variant, **r} for r in rows]
    out_dir = Path(config.paths.benchmark)
    out = out_dir / f"{variant}.json"
    with atomic_output(out, is_dir=False) as tmp:
        tmp.write_bytes(json_bytes(metrics))
    with atomic_output(out_dir / f"{variant}_speed.json", is_dir=False) as tmp:
        tmp.write_bytes(json_bytes(rows))
    log.info("wrote %s (%.1f s)", out, metrics["seconds"])
    return out
