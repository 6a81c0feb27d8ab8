"""Affine quantization of a checkpoint tensor, slice by slice: `mx.quantize` on slices
along the first axis (rows, or experts of an [E, out, in] stack). Quantization groups run
along the last axis, so slicing changes no byte: the result equals one `mx.quantize` of
the whole tensor, with one slice of bf16 resident instead of the tensor.

A matrix's bf16 comes from the original checkpoint, bit for bit what the float checkpoint
holds: an expert matrix decoded from its MXFP4 (`expert_rows`: a quarter of the float's
bytes, decoded by convert's own decoder to the very same bits), any other matrix read
as is (`checkpoint_rows`: bf16 in the original, under the same name).
Either is read or decoded straight into MLX's memory (`SliceRing`), not copied into it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator

import mlx.core as mx
import numpy as np

from tierquant.core.checkpoint import Checkpoint, row_slices
from tierquant.core.floatrows import read_expert_bf16
from tierquant.core.gptoss import EXPERT_KINDS, Weight
from tierquant.core.parallel import fill_stream, slice_streams
from tierquant.core.precision import Precision

SLICE_BYTES = 64 << 20  # bf16 input per mx.quantize call

Rows = Callable[[int, int], mx.array]
"""`rows(start, stop)`: a matrix's rows (or experts) [start, stop) as a bf16 mx.array."""


Fill = Callable[[int, int, np.ndarray], object]
"""`fill(start, stop, out)`: writes rows [start, stop) of a matrix's bf16 bits into `out`."""


class SliceRing:
    """`rows(start, stop)` (see `Rows`) that reads or decodes each slice by `fill` straight
    into MLX's own memory (a writable numpy view of an MLX buffer), reusing `depth`
    buffers in turn: no copy from numpy into MLX (18% of a quantize slice's time) and no
    fresh allocation (zeroing a new 64 MB MLX buffer costs as much as that copy).

    A slice's buffer is overwritten `depth` calls later: callers finish every slice's
    work before then. With `depth` = the number of streams the slices go round, both
    callers do (`quantize_slices` reads slice i + depth only once slice i is evaluated)."""

    def __init__(self, fill: Fill, row_shape: tuple[int, ...], depth: int) -> None:
        self.fill = fill
        self.row_shape = row_shape
        self.depth = depth
        self.buffers: list[tuple[mx.array, np.ndarray]] = []
        self.calls = 0

    def _buffer(self, rows: int) -> tuple[mx.array, np.ndarray]:
        shape = (rows, *self.row_shape)
        k = self.calls % self.depth
        self.calls += 1
        if k < len(self.buffers) and self.buffers[k][1].shape == shape:
            return self.buffers[k]
        with mx.stream(fill_stream()):  # evaluated off the streams quantize queues work on
            bits = mx.zeros(shape, dtype=mx.uint16)
        mx.eval(bits)
        view = np.array(bits, copy=False)
        if not (view.flags.writeable and view.flags.c_contiguous and view.shape == shape):
            raise RuntimeError(f"MLX gave no writable contiguous view of a {shape} array")
        if k < len(self.buffers):
            self.buffers[k] = (bits, view)
        else:
            self.buffers.append((bits, view))
        return bits, view

    def __call__(self, start: int, stop: int) -> mx.array:
        bits, view = self._buffer(stop - start)
        self.fill(start, stop, view)
        return bits.view(mx.bfloat16)


def expert_rows(original: Checkpoint, weight: Weight, depth: int) -> Rows:
    """`rows(start, stop)` of an expert matrix, decoded from the `original`'s MXFP4
    (`depth`: see `SliceRing`)."""
    if weight.kind not in EXPERT_KINDS:
        raise ValueError(f"{weight.name}: not an expert matrix")
    return SliceRing(
        lambda start, stop, out: read_expert_bf16(original, weight, start, stop, out),
        weight.shape[1:],
        depth,
    )


def checkpoint_rows(ckpt: Checkpoint, name: str, depth: int) -> Rows:
    """`rows(start, stop)` of tensor `name` of a bf16 checkpoint, read from its file
    (`depth`: see `SliceRing`)."""
    return SliceRing(
        lambda start, stop, out: ckpt.read_rows(name, start, stop, out),
        ckpt.info(name).shape[1:],
        depth,
    )


def slices(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """The [start, stop) slices along the first axis a bf16 tensor of `shape` is quantized in."""
    return list(row_slices(shape[0], 2 * math.prod(shape[1:]), SLICE_BYTES))


Sample = Callable[..., tuple[mx.array, ...]]
"""`sample(x, weight, scales, biases)`: extra arrays computed from a slice `x` and its
quantization on the slice's stream (e.g. its error), yielded with it."""


def quantize_slices(
    rows: Rows,
    shape: tuple[int, ...],
    precision: Precision,
    streams: tuple[mx.Stream, ...],
    *,
    sample: Sample | None = None,
    defer_sample: bool = False,
) -> Iterator[tuple[tuple[int, int], tuple[mx.array, ...], tuple[mx.array, ...]]]:
    """The one slice-wise `mx.quantize` loop: a bf16 tensor of `shape`, given slice by
    slice by `rows(start, stop)`, at an affine `precision`; yields, in slice order,
    `((start, stop), (weight, scales, biases), sample(...) or ())`, each evaluated.

    Slices are quantized asynchronously, round-robin over `streams` (`rows` must reuse
    at most one buffer per stream: SliceRing's depth), one per stream in flight, so on
    the CPU every core quantizes. A slice is yielded once it (and its sample) is
    evaluated and the next slice has been read into its buffer and queued: the caller's
    work on it (writing it, copying it) overlaps the next slice's quantization.
    `defer_sample`: queue the sample only once the slice is quantized (the CPU backend,
    `parallel.ops_queue_capped`: queued with it, its ops held this thread in
    `async_eval` while a stream stood idle); otherwise with it (a GPU never idles while
    the next slice is read)."""
    g, bits = precision.group_size, precision.bits
    bounds = slices(shape)
    in_flight: deque[tuple[mx.Stream, mx.array, tuple[mx.array, ...], tuple[mx.array, ...]]]
    in_flight = deque()

    def submit(i: int) -> None:
        x = rows(*bounds[i])
        stream = streams[i % len(streams)]
        with mx.stream(stream):
            quantized = tuple(mx.quantize(x, group_size=g, bits=bits))
            extra = sample(x, *quantized) if sample is not None and not defer_sample else ()
        mx.async_eval(*quantized, *extra)
        in_flight.append((stream, x, quantized, extra))

    for i in range(min(len(streams), len(bounds))):
        submit(i)
    for i in range(len(bounds)):
        stream, x, quantized, extra = in_flight.popleft()
        if sample is not None and defer_sample:
            with mx.stream(stream):
                extra = sample(x, *quantized)
            mx.async_eval(*extra)
        mx.eval(*quantized, *extra)
        del x  # its buffer is free: the next slice is read into it
        if i + len(streams) < len(bounds):
            submit(i + len(streams))
        yield bounds[i], quantized, extra


def quantize_rows(rows: Rows, shape: tuple[int, ...], precision: Precision) -> tuple[mx.array, ...]:
    """A bf16 tensor of `shape`, given slice by slice by `rows(start, stop)` (its rows or
    experts [start, stop)), at an affine `precision`: (weight, scales, biases) exactly as
    one `mx.quantize` of the whole tensor gives them, built from `quantize_slices` on
    `slice_streams()`, so the bf16 tensor is never whole in memory."""
    streams = slice_streams()
    out: list[mx.array] = []
    for k, ((start, stop), parts, _) in enumerate(quantize_slices(rows, shape, precision, streams)):
        if not out:
            out = [mx.zeros((shape[0], *a.shape[1:]), dtype=a.dtype) for a in parts]
        for whole, part in zip(out, parts, strict=True):
            whole[start:stop] = part  # updated in place: MLX donates the unshared buffer
        if (k + 1) % len(streams) == 0:
            mx.eval(*out)
    mx.eval(*out)
    return tuple(out)
