"""convert stage: the original MXFP4 checkpoint → a bf16 checkpoint in mlx-lm names.

Experts are dequantized exactly, one expert at a time, into `gate_proj` / `up_proj` /
`down_proj` as [experts, out, in] (the layout rule: tierquant.core.floatrows). Every
other tensor is copied bit for bit, in bounded row chunks. Shards are written as they
fill, so peak memory is a few expert slices, whatever the depth of the model. The
result loads with `mlx_lm.load` as is (its sanitize is skipped because
`gate_proj.weight` exists). It is an export for tools that want a bf16 gpt-oss: no
stage of the pipeline reads it (they decode the original's MXFP4 themselves, through
tierquant.core.floatrows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tierquant.core.checkpoint import Checkpoint, ShardedWriter
from tierquant.core.files import atomic_output, read_json, write_json
from tierquant.core.floatrows import iter_float_rows, read_expert_bf16
from tierquant.core.gptoss import (
    EXPERT_KINDS,
    GptOssShape,
    Weight,
    copy_side_files,
    mlx_float_specs,
    mlx_layer_weights,
    mlx_weights,
    verify_original,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertStats:
    tensors: int
    bytes_written: int
    shards: int


def convert_checkpoint(src: Path, dest: Path, *, max_shard_bytes: int) -> ConvertStats:
    """The convert stage: write the bf16, mlx-lm-named checkpoint of `src` (the original)
    to `dest`, atomically, in shards of at most `max_shard_bytes`."""
    src, dest = Path(src), Path(dest)
    original = verify_original(src)
    config = read_json(src / "config.json")
    shape = GptOssShape.from_config(config, str(src / "config.json"))
    specs = mlx_float_specs(shape)
    total = sum(s.nbytes for s in specs)
    log.info("converting %s → %s: %d tensors, %.2f GB of bf16", src, dest, len(specs), total / 1e9)
    with (
        original,
        atomic_output(dest) as tmp,
        ShardedWriter(
            tmp, specs, max_shard_bytes=max_shard_bytes, metadata={"format": "mlx"}
        ) as writer,
        tqdm(
            total=total, unit="B", unit_scale=True, desc="convert", leave=False, disable=None
        ) as bar,
    ):
        for layer in range(shape.num_hidden_layers):
            _convert_experts(original, writer, shape, layer, bar)
        for w in mlx_weights(shape):
            if w.kind not in EXPERT_KINDS:  # copied, or an expert bias split out
                for chunk in iter_float_rows(original, w):
                    writer.write(w.name, chunk)
                    bar.update(chunk.nbytes)
        float_config = {k: v for k, v in config.items() if k != "quantization_config"}
        write_json(tmp / "config.json", float_config)
        copy_side_files(src, tmp)
        shards = len(writer.shard_names)
    log.info("wrote %s: %d tensors in %d shard(s), %.2f GB", dest, len(specs), shards, total / 1e9)
    return ConvertStats(tensors=len(specs), bytes_written=total, shards=shards)


def _convert_experts(
    src: Checkpoint, writer: ShardedWriter, shape: GptOssShape, layer: int, bar: tqdm
) -> None:
    """Decode one layer's expert matrices, one expert at a time, gate/up/down in turn
    (their biases are split with the other tensors, `iter_float_rows`)."""
    matrices: list[Weight] = [w for w in mlx_layer_weights(shape, layer) if w.kind in EXPERT_KINDS]
    buffers = {w.name: np.empty(w.shape[1:], np.uint16) for w in matrices}
    for e in range(shape.num_local_experts):
        for w in matrices:
            out = buffers[w.name]
            read_expert_bf16(src, w, e, e + 1, out=out[None])
            writer.write(w.name, out)
            bar.update(out.nbytes)
