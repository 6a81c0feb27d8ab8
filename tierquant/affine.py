"""Affine quantization of a checkpoint tensor, slice by slice: `mx.quantize` on slices
along the first axis (rows, or experts of an [E, out, in] stack). Quantization groups run
along the last axis, so slicing changes no byte: the result equals one `mx.quantize` of
the whole tensor, with one slice of bf16 resident instead of the tensor."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from .checkpoint import Checkpoint, row_slices
from .parallel import slice_streams
from .precision import Precision

SLICE_BYTES = 64 << 20  # bf16 input per mx.quantize call


def quantize_tensor(src: Checkpoint, name: str, precision: Precision) -> tuple[mx.array, ...]:
    """Tensor `name` of checkpoint `src` at an affine `precision` (see `quantize_rows`)."""
    info = src.info(name)

    def rows(start: int, stop: int) -> mx.array:
        return mx.array(src.read_rows(name, start, stop)).view(mx.bfloat16)

    return quantize_rows(rows, info.shape, precision)


def quantize_rows(
    rows: Callable[[int, int], mx.array], shape: tuple[int, ...], precision: Precision
) -> tuple[mx.array, ...]:
    """A bf16 tensor of `shape`, given slice by slice by `rows(start, stop)` (its rows or
    experts [start, stop), lazy or not), at an affine `precision`: (weight, scales,
    biases) exactly as one `mx.quantize` of the whole tensor gives them. The slices are
    quantized on `slice_streams()` (every core on the CPU) straight into the outputs, so
    the bf16 tensor is never whole in memory."""
    g, bits = precision.group_size, precision.bits
    row_bytes = 2 * math.prod(shape[1:])
    streams = slice_streams()
    out: list[mx.array] = []
    for k, (start, stop) in enumerate(row_slices(shape[0], row_bytes, SLICE_BYTES)):
        with mx.stream(streams[k % len(streams)]):
            parts = mx.quantize(rows(start, stop), group_size=g, bits=bits)
        if not out:
            out = [mx.zeros((shape[0], *a.shape[1:]), dtype=a.dtype) for a in parts]
        for whole, part in zip(out, parts, strict=True):
            whole[start:stop] = part  # updated in place: MLX donates the unshared buffer
        if (k + 1) % len(streams) == 0:
            mx.eval(*out)
    mx.eval(*out)
    return tuple(out)
