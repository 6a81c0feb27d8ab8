"""convert stage: the original MXFP4 checkpoint → a bf16 checkpoint in mlx-lm names.

Experts are dequantized exactly (tierquant.mxfp4), one expert at a time: gate_up's
interleaved rows are split into `gate_proj` / `up_proj` (row 2i is gate, 2i+1 up, the
same for the bias) and `down_proj` is renamed, all kept as [experts, out, in]. Every
other tensor is copied bit for bit, in bounded row chunks. Shards are written as they
fill, so peak memory is a few expert slices, whatever the depth of the model. The
result loads with `mlx_lm.load` as is (its sanitize is skipped because
`gate_proj.weight` exists) and is what the quantize stage reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoint import Checkpoint, ShardedWriter
from .files import atomic_output, read_json, write_json
from .gptoss import (
    EXPERT_KINDS,
    GptOssShape,
    copy_side_files,
    iter_float_rows,
    mlx_float_specs,
    mlx_weights,
    verify_original,
)
from .mxfp4 import dequantize_to_bf16_bits

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
    """Dequantize one layer's expert matrices, one expert at a time, into gate/up/down
    (their biases are split with the other tensors, `iter_float_rows`)."""
    hf = f"model.layers.{layer}.mlp.experts"
    out = f"model.layers.{layer}.mlp.experts"
    inter, hidden = shape.intermediate_size, shape.hidden_size
    gate = np.empty((inter, hidden), np.uint16)
    up = np.empty((inter, hidden), np.uint16)
    down = np.empty((hidden, inter), np.uint16)
    gate_up_scales = f"{hf}.gate_up_proj_scales"
    down_scales = f"{hf}.down_proj_scales"
    for e in range(shape.num_local_experts):
        blocks = src.read_rows(f"{hf}.gate_up_proj_blocks", e, e + 1)[0]
        scales = src.read_rows(gate_up_scales, e, e + 1)[0]
        # Errors name the expert and which interleaved rows (gate: even, up: odd).
        where = f"{gate_up_scales} (expert {e}, %s rows of gate_up)"
        dequantize_to_bf16_bits(blocks[0::2], scales[0::2], out=gate, name=where % "even")
        dequantize_to_bf16_bits(blocks[1::2], scales[1::2], out=up, name=where % "odd")
        writer.write(f"{out}.gate_proj.weight", gate)
        writer.write(f"{out}.up_proj.weight", up)
        blocks = src.read_rows(f"{hf}.down_proj_blocks", e, e + 1)[0]
        scales = src.read_rows(down_scales, e, e + 1)[0]
        dequantize_to_bf16_bits(blocks, scales, out=down, name=f"{down_scales} (expert {e})")
        writer.write(f"{out}.down_proj.weight", down)
        bar.update(gate.nbytes + up.nbytes + down.nbytes)
