"""quantize stage: one tier's tensors at the tier's precision, read from the original.

- affine bits: `mx.quantize` slice by slice (tierquant.core.affine), so peak memory is
  a slice, not a tensor; each matrix read from the original as the float checkpoint
  would hold it (tierquant.core.floatrows: experts decoded from MXFP4).
- affine bits, matrices a `Rounder` takes (tierquant.build.gptq: GPTQ): written by it,
  in the same layout.
- mxfp4: the original's expert bytes repacked into mlx-lm's layout, losslessly.
- bf16, and every vector (norms, biases, sinks) whatever the tier: copied.

Output: `<out>/<tier>-0000N-of-0000M.safetensors` in mlx-lm names and the tier's
manifest (tierquant.build.manifest).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from tierquant.build.manifest import ERROR_ROW_STRIDE, MANIFEST, quantized_specs
from tierquant.core.affine import Rows, checkpoint_rows, expert_rows, quantize_slices
from tierquant.core.checkpoint import Checkpoint, ShardedWriter
from tierquant.core.files import atomic_output, json_bytes
from tierquant.core.floatrows import iter_float_rows, mxfp4_source
from tierquant.core.gptoss import (
    EXPERT_KINDS,
    Weight,
    check_headers,
    mlx_weights,
    shape_of_checkpoint,
)
from tierquant.core.mxfp4 import NAN_SCALE
from tierquant.core.parallel import ops_queue_capped, slice_streams
from tierquant.core.precision import Precision, check_quantizable
from tierquant.errors import TierquantError
from tierquant.plan.planfile import read_plan

log = logging.getLogger(__name__)


class Rounder(Protocol):
    """Another rounding of some affine matrices into mx.quantize's layout (GPTQ:
    tierquant.build.gptq). `takes` picks them; `write` is handed them in `order`, writes
    each one's weight/scales/biases into the writer and returns its relative RMSE on the
    sampled rows (as the round-to-nearest path records it); `manifest` is added to the
    tier's manifest under "rounding"."""

    method: str

    def takes(self, weight: Weight, precision: Precision) -> bool: ...

    def order(self, weights: list[Weight]) -> Iterator[Weight]: ...

    def write(
        self,
        original: Checkpoint,
        writer: ShardedWriter,
        weight: Weight,
        precision: Precision,
        bar: tqdm,
    ) -> float: ...

    def manifest(self) -> dict: ...


def quantize_tier(
    *,
    tier: str,
    tensor_names: list[str],
    precision: Precision,
    original_dir: Path,
    out_dir: Path,
    max_shard_bytes: int,
    rounder: Rounder | None = None,
) -> dict:
    """Quantize the tier's tensors (mlx-lm names) into `out_dir`, each read from
    `original_dir` as the float checkpoint holds it; return the manifest. `rounder`:
    the matrices it takes are rounded by it (after every other tensor, in its order)."""
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
    taken = [w for w in weights if rounder is not None and rounder.takes(w, precision)]
    others = [w for w in weights if w not in taken]
    streams = slice_streams()
    with (
        # headers against config.json (a wrong num_local_experts is named as such, not
        # found later as a short read of a tensor); headers only, no tensor data
        check_headers(original_dir) as original,
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
        for w in rounder.order(taken) if rounder is not None else ():
            err = rounder.write(original, writer, w, precision, bar)
            modules[w.module] = {**_module_entry(w, precision, err), "rounding": rounder.method}
        for w in others:
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
        if taken and rounder is not None:  # a round-to-nearest manifest keeps its bytes
            manifest["rounding"] = rounder.manifest()
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
    """Quantize `w` slice by slice (tierquant.core.affine.quantize_slices) into `writer`;
    return the relative RMSE of the whole tensor.

    The error is measured on every ERROR_ROW_STRIDE-th row (of every expert): exact for
    those rows, an estimate for the tensor, at a fraction of the cost of dequantizing
    everything (which would make this stage about 4x slower)."""
    err_sq = 0.0
    ref_sq = 0.0
    g, bits = precision.group_size, precision.bits
    row_bytes = 2 * math.prod(w.shape[1:])

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

    for (start, stop), (wq, _, _), (e, r, scales16, biases16) in quantize_slices(
        rows, w.shape, precision, streams, sample=error_sample, defer_sample=ops_queue_capped()
    ):
        err_sq += e.item()
        ref_sq += r.item()
        writer.write(f"{w.module}.weight", np.array(wq, copy=False))
        writer.write(f"{w.module}.scales", np.array(scales16, copy=False))
        writer.write(f"{w.module}.biases", np.array(biases16, copy=False))
        bar.update((stop - start) * row_bytes)
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
    rounder: Rounder | None = None,
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
        rounder=rounder,
    )
