"""How MLX work is spread over the cores: a few streams to round-robin slices over.

MLX runs each stream's ops in order on one thread, and its CPU kernels (`quantize`,
`gather_qmm`, ...) are single-threaded, so on the CPU backend independent pieces of work
(quantization slices, eval batches) put on different streams run on different cores.
On a GPU the default stream is returned twice: the GPU is parallel already, and the
second slot only lets the caller overlap its I/O with the work.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

MAX_CPU_STREAMS = 4  # pieces in flight at once on the CPU backend (memory: one each)


def ops_queue_capped() -> bool:
    """Whether queueing many ops makes `mx.async_eval` wait: on the CPU backend every op is
    a task of MLX's scheduler, and `async_eval` waits while more than 10 are queued (its
    MAX_ACTIVE_TASKS), so a dozen small ops queued behind a long one on each stream keep
    the caller waiting on the first stream while the second idles. On a GPU ops are
    batched into command buffers, and it is the buffers that count."""
    return mx.default_device() == mx.cpu


@functools.cache
def slice_streams() -> tuple[mx.Stream, ...]:
    """One stream per core on the CPU backend (at least 2, at most MAX_CPU_STREAMS), the
    default stream twice on a GPU (module docstring)."""
    device = mx.default_device()
    if device != mx.cpu:
        stream = mx.default_stream(device)
        return (stream, stream)
    count = max(2, min(MAX_CPU_STREAMS, os.cpu_count() or 1))
    return (mx.default_stream(device), *(mx.new_stream(device) for _ in range(count - 1)))


@functools.cache
def fill_stream() -> mx.Stream:
    """A CPU stream of its own for allocating buffers the caller fills: evaluating them
    there never waits behind the quantization queued on `slice_streams()`."""
    return mx.new_stream(mx.cpu)
