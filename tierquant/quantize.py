"""quantize stage: one tier's tensors at the tier's precision, read from the original.

Each matrix of the tier is quantized with `mx.quantize`, streamed in slices along its
first axis (rows, or experts for [E, out, in] stacks; quantization groups run along the
last axis, so slicing changes no byte) so peak memory is one slice, not one tensor.
Every tensor is read from the original checkpoint exactly as the float checkpoint holds
it (`tierquant.affine`, `iter_float_rows`): expert matrices decoded from MXFP4 by
convert's own decoder (the same bf16 bits from a quarter of the bytes), everything else
copied or split as convert does. So the stage reads what measure has just read (in the
page cache), never the float checkpoint, several times the original's size. Vectors
(norms, biases, sinks) cannot be quantized and are copied as bf16 whatever the
tier says. `mxfp4` keeps the original checkpoint's expert bytes: blocks become mlx-lm's
uint32 `weight`, E8M0 bytes its `scales` — a lossless repack, no requantization.

Output: `<out>/` holds `<tier>-0000N-of-0000M.safetensors` shards in mlx-lm names
(`<module>.weight`/`.scales`/`.biases`) and `manifest.json` recording, per module,
bits, group size, mode, its tensors and the quantization error (relative RMSE of the
dequantized weight against the bf16 one, measured on every 16th row).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .affine import Rows, checkpoint_rows, expert_rows, slices
from .checkpoint import Checkpoint, ShardedWriter, TensorSpec
from .errors import TierquantError
from .files import atomic_output, json_bytes
from .gptoss import (
    EXPERT_KINDS,
    Weight,
    iter_float_rows,
    mlx_weights,
    mxfp4_source,
    shape_of_checkpoint,
    verify_original,
)
from .mxfp4 import GROUP_SIZE as MXFP4_GROUP
from .mxfp4 import NAN_SCALE
from .parallel import ops_queue_capped, slice_streams
from .plan import read_plan
from .precision import Precision, check_quantizable

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ERROR_ROW_STRIDE = 16  # quantization error measured on every 16th row


def quantized_specs(weight: Weight, precision: Precision) -> list[TensorSpec]:
    """The tensors a weight becomes at `precision` (mlx-lm's names, dtypes and shapes)."""
    if not precision.stores_quantized(weight.kind):
        return [TensorSpec(weight.name, "BF16", weight.shape)]
    *lead, rows, cols = weight.shape
    module = weight.module
    if precision.mode == "mxfp4":  # 8 codes of 4 bits per uint32, one E8M0 byte per block
        return [
            TensorSpec(f"{module}.weight", "U32", (*lead, rows, cols // 8)),
            TensorSpec(f"{module}.scales", "U8", (*lead, rows, cols // MXFP4_GROUP)),
        ]
    groups = cols // precision.group_size
    return [
        TensorSpec(f"{module}.weight", "U32", (*lead, rows, cols * precision.bits // 32)),
        TensorSpec(f"{module}.scales", "BF16", (*lead, rows, groups)),
        TensorSpec(f"{module}.biases", "BF16", (*lead, rows, groups)),
    ]


def quantize_tier(
    *,
    tier: str,
    tensor_names: list[str],
    precision: Precision,
    original_dir: Path,
    out_dir: Path,
    max_shard_bytes: int,
) -> dict:
    """Quantize the tier's tensors (mlx-lm names) into `out_dir`, each read from
    `original_dir` as the float checkpoint holds it; return the manifest."""
    shape = shape_of_checkpoint(original_dir)
    by_name = {w.name: w for w in mlx_weights(shape)}
    unknown = [n for n in tensor_names if n not in by_name]
    if unknown:
        raise TierquantError(
            f"plan for tier {tier!r} names {unknown[0]!r}, which is not a tensor of the "
            f"model in {original_dir} (mlx-lm names); rerun the plan stage"
        )
    weights = [by_name[n] for n in tensor_names]
    for w in weights:
        check_quantizable(tier, precision, name=w.name, kind=w.kind, shape=w.shape)
    specs = [s for w in weights for s in quantized_specs(w, precision)]
    total_in = sum(w.numel * 2 for w in weights)
    modules: dict[str, dict] = {}
    vectors: list[str] = []
    log.info(
        "quantizing tier %r (%s): %d tensors, %.2f GB of bf16 in",
        tier,
        precision.label,
        len(weights),
        total_in / 1e9,
    )
    streams = slice_streams()
    with (
        # headers against config.json, as convert and plan check them (a wrong
        # num_local_experts is named as such, not found later as a short read of a
        # tensor); headers and side files only, no tensor data
        verify_original(original_dir) as original,
        atomic_output(out_dir) as tmp,
        ShardedWriter(
            tmp,
            specs,
            max_shard_bytes=max_shard_bytes,
            metadata={"format": "mlx"},
            name_prefix=tier,
        ) as writer,
        tqdm(
            total=total_in,
            unit="B",
            unit_scale=True,
            desc=f"quantize {tier}",
            leave=False,
            disable=None,
        ) as bar,
    ):
        for w in weights:
            if not precision.stores_quantized(w.kind):
                for chunk in iter_float_rows(original, w):
                    writer.write(w.name, chunk)
                    bar.update(chunk.nbytes)
                if w.is_matrix:
                    modules[w.module] = _module_entry(w, precision, None)
                else:
                    vectors.append(w.name)
                continue
            if precision.mode == "mxfp4":
                _repack_mxfp4(original, writer, w, bar)
                modules[w.module] = _module_entry(w, precision, 0.0)
            else:
                depth = len(streams)  # one buffer per slice in flight (SliceRing)
                rows = (
                    expert_rows(original, w, depth)
                    if w.kind in EXPERT_KINDS
                    else checkpoint_rows(original, w.name, depth)  # same name, same bytes
                )
                err = _quantize_affine(rows, streams, writer, w, precision, bar)
                modules[w.module] = _module_entry(w, precision, err)
        manifest = {
            "tier": tier,
            "precision": precision.quantization() or {"mode": "bf16"},
            "bits_per_weight": float(precision.bits_per_weight),
            "params": sum(w.numel for w in weights),
            "bytes": writer.total_size,
            "shards": writer.shard_names,
            "modules": dict(sorted(modules.items())),
            "vectors": sorted(vectors),
            "tensors": {s.name: writer.weight_map[s.name] for s in specs},
        }
        shard_names = writer.shard_names
        # Inside atomic_output: the tier directory appears with its manifest or not at all.
        (tmp / MANIFEST).write_bytes(json_bytes(manifest))
    log.info("wrote %s: %d shard(s), %.2f MB", out_dir, len(shard_names), manifest["bytes"] / 1e6)
    return manifest


def _module_entry(w: Weight, precision: Precision, rel_rmse: float | None) -> dict:
    entry: dict = {
        "kind": w.kind,
        "layer": w.layer,
        "params": w.numel,
        "mode": precision.mode if w.is_matrix else "bf16",
    }
    if precision.quantized:
        entry["bits"] = precision.bits
        entry["group_size"] = precision.group_size
    entry["rel_rmse"] = rel_rmse
    return entry


def _quantize_affine(
    rows: Rows,
    streams: tuple[mx.Stream, ...],
    writer: ShardedWriter,
    w: Weight,
    precision: Precision,
    bar: tqdm,
) -> float:
    """mx.quantize slice by slice (`rows`: tierquant.affine.Rows); return the relative RMSE of
    the whole tensor.

    Slices are quantized asynchronously, round-robin over `streams` (`slice_streams()`),
    one per stream in flight, and on the CPU backend every core quantizes. The next slice
    is read into the buffer of the one just finished (SliceRing) and queued before that one
    is written, so reading and writing overlap the quantization. Each slice's outputs and
    error sums are consumed in slice order, so the bytes and the recorded error do not
    depend on the stream count.

    The error is measured on every ERROR_ROW_STRIDE-th row (of every expert): exact
    for those rows, an estimate for the tensor, at a fraction of the cost of
    dequantizing everything (which would make this stage about 4x slower). On the CPU
    its dozen small ops are queued only once the slice is quantized
    (`parallel.ops_queue_capped`: queued with the quantization they held this thread in
    `async_eval` while a stream stood idle, measured 1.5 of 2 cores busy); on a GPU they
    are queued with it, so the GPU is never idle while the next slice is read.
    """
    err_sq = 0.0
    ref_sq = 0.0
    module = w.module
    g, bits = precision.group_size, precision.bits
    bounds = slices(w.shape)
    defer_error = ops_queue_capped()
    in_flight: deque[tuple[mx.Stream, mx.array, tuple[mx.array, ...], tuple[mx.array, ...]]]
    in_flight = deque()

    def error_sample(x: mx.array, wq: mx.array, scales: mx.array, biases: mx.array):
        """(squared error, squared reference) sums of the sampled rows, and the scales and
        biases as uint16 for numpy (a view is an op too: made later, on the default stream,
        it would queue behind a slice)."""
        sample = (..., slice(None, None, ERROR_ROW_STRIDE), slice(None))
        dq = mx.dequantize(wq[sample], scales[sample], biases[sample], group_size=g, bits=bits)
        x32 = x[sample].astype(mx.float32)
        diff = dq.astype(mx.float32) - x32
        return (
            mx.sum(diff * diff),
            mx.sum(x32 * x32),
            scales.view(mx.uint16),
            biases.view(mx.uint16),
        )

    def submit(i: int) -> None:
        x = rows(*bounds[i])
        stream = streams[i % len(streams)]
        with mx.stream(stream):
            quantized = mx.quantize(x, group_size=g, bits=bits)
            sampled = () if defer_error else error_sample(x, *quantized)
        mx.async_eval(*quantized, *sampled)
        in_flight.append((stream, x, quantized, sampled))

    for i in range(min(len(streams), len(bounds))):
        submit(i)
    for i in range(len(bounds)):
        stream, x, (wq, scales, biases), sampled = in_flight.popleft()
        if not sampled:
            with mx.stream(stream):
                sampled = error_sample(x, wq, scales, biases)
            mx.async_eval(*sampled)
        e, r, scales16, biases16 = sampled
        err_sq += e.item()
        ref_sq += r.item()
        nbytes = x.nbytes
        del x, sampled  # x's buffer is free: the next slice is read into it
        if i + len(streams) < len(bounds):
            submit(i + len(streams))
        writer.write(f"{module}.weight", np.array(wq, copy=False))
        writer.write(f"{module}.scales", np.array(scales16, copy=False))
        writer.write(f"{module}.biases", np.array(biases16, copy=False))
        bar.update(nbytes)
    return math.sqrt(err_sq / ref_sq) if ref_sq else 0.0


def _repack_mxfp4(original: Checkpoint, writer: ShardedWriter, w: Weight, bar: tqdm) -> None:
    """An expert matrix in mlx-lm's mxfp4 layout, straight from the original's bytes."""
    blocks_name, scales_name, rows = mxfp4_source(w)
    experts = w.shape[0]
    for e in range(experts):
        blocks = original.read_rows(blocks_name, e, e + 1)[:, rows]
        scales = original.read_rows(scales_name, e, e + 1)[:, rows]
        if scales.max(initial=0) == NAN_SCALE:
            raise TierquantError(
                f"{scales_name}: scale byte {NAN_SCALE} (NaN in the MX spec) in expert {e}"
            )
        packed = np.ascontiguousarray(blocks).view(np.uint32)
        writer.write(f"{w.module}.weight", packed.reshape(*packed.shape[:-2], -1))
        writer.write(f"{w.module}.scales", np.ascontiguousarray(scales))
        bar.update(w.numel * 2 // experts)


def quantize(
    *,
    tier: str,
    tiers: dict[str, Precision],
    plan_dir: Path,
    original_dir: Path,
    out_dir: Path,
    max_shard_bytes: int,
) -> dict:
    """The quantize@<tier> stage: the tier's plan file (`plan_dir/<tier>.json`) at
    `tiers[tier]` -> `out_dir` (see `quantize_tier`)."""
    if tier not in tiers:
        raise TierquantError(
            f"params: tiers has no {tier!r} (tiers: {', '.join(tiers)}); "
            "dvc.yaml runs quantize once per key of `tiers`"
        )
    return quantize_tier(
        tier=tier,
        tensor_names=[t["name"] for t in read_plan(Path(plan_dir), tier)["tensors"]],
        precision=tiers[tier],
        original_dir=Path(original_dir),
        out_dir=Path(out_dir),
        max_shard_bytes=max_shard_bytes,
    )
