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

The memory model (stored bytes, bytes read per token, KV cache, fit and bandwidth tables)
is tierquant.plan.footprint's; this module measures and writes both into the metrics.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierquant.core.checkpoint import Checkpoint
from tierquant.core.files import atomic_output, json_bytes, read_json
from tierquant.core.gptoss import GptOssShape
from tierquant.errors import TierquantError
from tierquant.plan.footprint import (
    GIB,
    PARTS,
    MemoryModel,
    bandwidth_table,
    bytes_per_token,
    fit_table,
    stored_bytes,
    weight_count,
)

log = logging.getLogger(__name__)

VARIANTS = ("model", "original")
THIS_MACHINE = "this machine"


@dataclass
class BenchmarkSettings:
    """How the speed benchmark runs (params: `benchmark`): `contexts` are prompt lengths,
    each timed `trials` times after `warmup` untimed runs generating `generate_tokens`;
    prompts are seeded random token ids; `probe_mib` sizes the memory-bandwidth probe;
    `chips` maps a chip name to its memory bandwidth in GB/s (vendor figures)."""

    contexts: list[int] = field(default_factory=lambda: [1024, 4096])
    generate_tokens: int = 128
    trials: int = 3
    warmup: int = 1
    seed: int = 0
    prefill_step_size: int = 2048
    probe_mib: int = 512
    chips: dict[str, float] = field(default_factory=dict)


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


def check_contexts(model_dir: Path, cfg: BenchmarkSettings) -> tuple[GptOssShape, int]:
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


def memory_available() -> tuple[int, str]:
    """Bytes this machine can give a model now, and where the figure comes from: Metal's
    recommended working set on a Mac, else the kernel's MemAvailable."""
    import mlx.core as mx

    if mx.metal.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        return int(info["max_recommended_working_set_size"]), "Metal's recommended working set"
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable (/proc/meminfo)"
    import os

    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages), "available physical pages (sysconf)"


def memory_check(model_dir: Path, memory_model: MemoryModel) -> dict[str, Any]:
    """Whether `model_dir`'s weights (their stored bytes: what loading makes resident)
    plus `memory_model.overhead_gib` fit in what this machine can give it, from the
    headers alone: checked before loading, so a model that cannot fit is reported
    instead of swapping or being killed."""
    with Checkpoint(Path(model_dir)) as ckpt:
        resident = sum(info.nbytes for info in ckpt.tensors.values())
    need = resident + memory_model.overhead_gib * GIB
    available, source = memory_available()
    fits = need <= available
    return {
        "resident_gib": round(resident / GIB, 3),
        "overhead_gib": memory_model.overhead_gib,
        "available_gib": round(available / GIB, 3),
        "available_from": source,
        "fits": fits,
        "verdict": "fits"
        if fits
        else f"does not fit: {need / GIB:.1f} GiB > {available / GIB:.1f} GiB",
    }


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
    model: Any, tokenizer: Any, prompt: list[int], cfg: BenchmarkSettings, memory: PeakMemory
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


@dataclass
class Measured:
    """What a benchmark run measures; every other figure is computed from these and the
    model's headers (`benchmark_report`)."""

    load_s: float  # mlx_lm.load, weights evaluated
    memory_source: str  # PeakMemory.source
    after_load_bytes: int
    # prompt length -> its timed runs: {"prefill_tps", "generation_tps", "peak_bytes"}
    runs: dict[int, list[dict[str, float]]]
    seconds: dict[int, float]  # prompt length -> wall time of its runs
    bandwidth: dict[str, Any]  # measure_read_bandwidth's result


def run_benchmark(
    model_dir: Path,
    cfg: BenchmarkSettings,
    memory_model: MemoryModel,
    machine: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Benchmark the model in `model_dir`: (metrics, plot rows). See the module doc."""
    model_dir = Path(model_dir)
    shape, _ = check_contexts(model_dir, cfg)
    check = memory_check(model_dir, memory_model)
    if not check["fits"]:
        log.warning("%s: %s (%s); not loaded", model_dir, check["verdict"], check["available_from"])
        return {"path": str(model_dir), "memory_check": check, "speed": {}}, []
    memory = PeakMemory()
    memory.reset()
    model, tokenizer, load_s = load_model(model_dir)
    after_load = memory.current()
    tokenizer.eos_token_ids = set()  # as mlx_lm.benchmark: never stop early
    log.info("loaded %s in %.2f s (%.3f GiB in memory)", model_dir, load_s, after_load / GIB)
    runs: dict[int, list[dict[str, float]]] = {}
    seconds: dict[int, float] = {}
    for c in cfg.contexts:
        t0 = time.perf_counter()
        prompt = prompt_tokens(shape.vocab_size, c, cfg.seed)
        runs[c] = time_context(model, tokenizer, prompt, cfg, memory)
        seconds[c] = time.perf_counter() - t0
        log.info(
            "context %d: prefill %.1f tok/s, generation %.1f tok/s (medians of %d), peak %.3f GiB",
            c,
            statistics.median(r["prefill_tps"] for r in runs[c]),
            statistics.median(r["generation_tps"] for r in runs[c]),
            cfg.trials,
            max(r["peak_bytes"] for r in runs[c]) / GIB,
        )
    del model
    measured = Measured(
        load_s=load_s,
        memory_source=memory.source,
        after_load_bytes=after_load,
        runs=runs,
        seconds=seconds,
        bandwidth=measure_read_bandwidth(cfg.probe_mib),
    )
    metrics, rows = benchmark_report(model_dir, cfg, memory_model, machine, measured)
    return {**metrics, "memory_check": check}, rows


def benchmark_report(
    model_dir: Path,
    cfg: BenchmarkSettings,
    memory_model: MemoryModel,
    machine: Mapping[str, Any] | None,
    measured: Measured,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The benchmark metrics and plot rows of `model_dir` from what was `measured`: the
    speed summaries, and the size, fit and bandwidth tables from the model's headers."""
    model_dir = Path(model_dir)
    shape, max_positions = check_contexts(model_dir, cfg)
    with Checkpoint(model_dir) as ckpt:
        tensors = list(ckpt.tensors.values())
    size = stored_bytes(tensors)
    disk = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    speed: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for c in cfg.contexts:
        runs = measured.runs[c]
        prefill = summarize([r["prefill_tps"] for r in runs])
        generation = summarize([r["generation_tps"] for r in runs])
        peak_gib = round(max(r["peak_bytes"] for r in runs) / GIB, 4)
        speed[str(c)] = {
            "prompt_tokens": c,
            "prefill_tps": prefill,
            "generation_tps": generation,
            "peak_memory_gib": peak_gib,
            "seconds": round(measured.seconds[c], 2),
        }
        rows.append(
            {
                "context": c,
                "prefill_tps": prefill["median"],
                "generation_tps": generation["median"],
                "peak_memory_gib": peak_gib,
            }
        )
    table = bandwidth_table(
        bytes_per_token(tensors, shape),
        shape,
        cfg.contexts,
        cfg.generate_tokens,
        {**cfg.chips, THIS_MACHINE: measured.bandwidth["gbps"]},
    )
    for c, row in table["contexts"].items():
        bound = row["bound_tps"][THIS_MACHINE]
        row["measured_tps"] = speed[c]["generation_tps"]["median"]
        row["efficiency"] = round(row["measured_tps"] / bound, 4) if bound else math.nan
    table["machine"] = measured.bandwidth

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
        "load_s": round(measured.load_s, 3),
        "memory": {
            "source": measured.memory_source,
            "after_load_gib": round(measured.after_load_bytes / GIB, 4),
            "peak_gib": max(s["peak_memory_gib"] for s in speed.values()),
        },
        "speed": speed,
        "bandwidth": table,
        "fit": fit_table(size["total"], shape, max_positions, memory_model),
    }
    return metrics, rows


def write_benchmark(
    out_dir: Path, variant: str, metrics: dict[str, Any], rows: list[dict[str, Any]]
) -> Path:
    """Write `out_dir/<variant>.json` (the metrics, tagged with the variant) and
    `<variant>_speed.json` (the plot rows), each a fresh file; the metrics path."""
    out_dir = Path(out_dir)
    out = out_dir / f"{variant}.json"
    with atomic_output(out, is_dir=False) as tmp:
        tmp.write_bytes(json_bytes({"variant": variant, **metrics}))
    with atomic_output(out_dir / f"{variant}_speed.json", is_dir=False) as tmp:
        tmp.write_bytes(json_bytes([{"variant": variant, **r} for r in rows]))
    return out


def benchmark(
    *,
    variant: str,
    model_dir: Path,
    machine_path: Path,
    settings: BenchmarkSettings,
    memory_model: MemoryModel,
    out_dir: Path,
) -> Path:
    """The benchmark@<variant> stage: benchmark `model_dir` (the model or the original)
    with `settings` on the machine `machine_path` describes; write
    `out_dir/<variant>.json` (metrics) and `out_dir/<variant>_speed.json` (plot rows)."""
    if variant not in VARIANTS:
        raise TierquantError(f"benchmark: variant must be one of {VARIANTS}, got {variant!r}")
    machine_path = Path(machine_path)
    if not machine_path.is_file():
        raise TierquantError(f"{machine_path}: missing; run the machine stage first")
    t0 = time.perf_counter()
    metrics, rows = run_benchmark(Path(model_dir), settings, memory_model, read_json(machine_path))
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    out = write_benchmark(Path(out_dir), variant, metrics, rows)
    log.info("wrote %s (%.1f s)", out, metrics["seconds"])
    return out
