"""The memory model of a gpt-oss checkpoint: bytes stored, bytes read per generated
token, KV cache, and what fits in how much memory at which bandwidth.

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

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tierquant.core.gptoss import GptOssShape, mlx_weights
from tierquant.plan.size import GIB

KV_DTYPE_BYTES = 2  # mlx-lm's KV cache holds keys/values in the activation dtype (bf16)
PARTS = ("experts", "attention", "router", "embed", "lm_head", "norms")


class TensorLike(Protocol):
    """What the tables need of a tensor: TensorSpec and TensorInfo both qualify."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int: ...


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


def gpu_limit_gib(memory_gib: float, memory: MemoryModel) -> float:
    """What macOS lets the GPU wire by default (its recommendedMaxWorkingSetSize):
    `gpu_fraction_small` of memory at or below `small_memory_gib`, else `gpu_fraction`."""
    small = memory_gib <= memory.small_memory_gib
    return memory_gib * (memory.gpu_fraction_small if small else memory.gpu_fraction)


@dataclass
class MemoryModel:
    """What a Mac's GPU may use of its unified memory (params: `memory`), for the fit
    table, the `budget.fit` budget and the benchmark's fit check.

    By default macOS lets the GPU wire `gpu_fraction` of memory (`gpu_fraction_small` at
    or below `small_memory_gib`); with the limit raised (`sudo sysctl
    iogpu.wired_limit_mb=N`) all but `os_reserve_gib`. `overhead_gib` is kept free for
    activations and MLX buffers. `memory_gib` are the fit table's memory sizes.
    """

    memory_gib: list[int] = field(default_factory=lambda: [32, 64, 96, 128, 192])
    gpu_fraction: float = 0.75
    gpu_fraction_small: float = 0.6667
    small_memory_gib: float = 36.0
    os_reserve_gib: float = 8.0
    overhead_gib: float = 2.0


WIRED_LIMITS = ("default", "raised")


def wired_limit_gib(memory_gib: float, memory: MemoryModel, rule: str) -> float:
    """GiB the GPU may use: `default` (macOS's own limit, gpu_limit_gib) or `raised`
    (`sudo sysctl iogpu.wired_limit_mb=N`: all but `os_reserve_gib`)."""
    if rule == "default":
        return gpu_limit_gib(memory_gib, memory)
    if rule == "raised":
        return memory_gib - memory.os_reserve_gib
    raise ValueError(f"wired limit rule must be one of {WIRED_LIMITS}, got {rule!r}")


def max_weight_bytes(
    memory_gib: float, context: int, shape: GptOssShape, memory: MemoryModel, rule: str
) -> int:
    """The most weight bytes that still fit with a `context`-token KV cache (the fit
    table's rule, solved for the weights): limit - overhead - KV cache, floored."""
    limit = wired_limit_gib(memory_gib, memory, rule) - memory.overhead_gib
    return math.floor(limit * GIB) - kv_cache_bytes(shape, context)


def fit_rule(memory: MemoryModel) -> str:
    """The fit rule in words, for the metrics and the card."""
    return (
        f"default: the GPU may use {memory.gpu_fraction:g} of unified memory "
        f"({memory.gpu_fraction_small:.3g} at {memory.small_memory_gib:g} GiB and below), "
        "macOS's default wired limit; raised: all but "
        f"{memory.os_reserve_gib:g} GiB (sudo sysctl iogpu.wired_limit_mb=N). A model fits if "
        f"weights + {memory.overhead_gib:g} GiB overhead fit; max_context is the longest "
        "context whose bf16 KV cache fits in the rest (capped at max_position_embeddings)"
    )


def fit_table(
    weight_bytes: int, shape: GptOssShape, max_positions: int, memory: MemoryModel
) -> dict[str, Any]:
    """Per memory size (GiB): fits / max_context under the default and raised limits."""
    need = weight_bytes + memory.overhead_gib * GIB
    sizes: dict[str, Any] = {}
    for size in memory.memory_gib:
        row: dict[str, Any] = {"memory_gib": size}
        for label in WIRED_LIMITS:
            limit = wired_limit_gib(size, memory, label)
            context = max_context(shape, limit * GIB - need, max_positions)
            row[f"gpu_limit_gib_{label}"] = round(limit, 2)
            row[f"fits_{label}"] = context > 0
            row[f"max_context_{label}"] = context
        sizes[str(size)] = row
    return {
        "rule": fit_rule(memory),
        "weights_gib": round(weight_bytes / GIB, 3),
        "overhead_gib": memory.overhead_gib,
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
