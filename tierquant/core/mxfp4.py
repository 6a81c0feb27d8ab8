"""The checkpoint's number formats in numpy: MXFP4 (OCP microscaling FP4) decoded exactly
to bf16 bit patterns, an MXFP4 encoder, and bf16 as uint16 bit patterns (numpy has no
bfloat16 dtype: `to_bf16_bits`, `from_bf16_bits`).

Layout (see docs/gpt-oss-format.md, "MXFP4 packing"): blocks uint8 ``[..., G, 16]`` hold
32 e2m1 codes per group, low nibble first; scales uint8 ``[..., G]`` are E8M0 exponents,
``2^(s - 127)``.

Decoding uses a 65536-entry uint32 table indexed by ``scale << 8 | byte`` that yields the two
bf16 values of one byte at once (low 16 bits = earlier element). The table is built from exact
float64 products, so the result is bit-exact by construction. Work is split into cache-sized
chunks over a few threads (``np.take`` releases the GIL).

Assumes a little-endian host (checked at import): the uint32 -> uint16 view relies on it.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from tierquant.errors import TierquantError

if sys.byteorder != "little":  # the uint32 -> 2 x uint16 view below relies on it
    raise ImportError("tierquant.core.mxfp4 assumes a little-endian host")

FP4_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
"""e2m1 code -> value; bit 3 is the sign."""

GROUP_SIZE = 32
"""Values per MXFP4 block (16 bytes)."""

SCALE_BIAS = 127
MAX_EXACT_SCALE = 252
"""Every code decodes to a finite bf16 for scale bytes up to this one."""

NAN_SCALE = 255
"""E8M0 NaN."""

# Smallest |code| & 7 that overflows bf16 at scale bytes 253 and 254 (|v| >= 4 resp. >= 2).
_OVERFLOW_MIN_MAGNITUDE_CODE = {253: 6, 254: 4}

_CHUNK_GROUPS = 16384
"""Groups per inner step: 256 KB of blocks, 512 KB of indices, 1 MB of output (fits L2)."""


class MXFP4Error(TierquantError):
    """Invalid MXFP4 data: NaN scale, bf16 overflow, or mismatched block/scale shapes."""


def default_threads() -> int:
    """Decoder threads used when none are given: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


@lru_cache(maxsize=1)
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=default_threads(), thread_name_prefix="mxfp4")


def _f32_to_bf16_bits_exact(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, asserting the low 16 bits are zero (no rounding happened)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    finite = np.isfinite(values)
    assert not np.any(bits[finite] & 0xFFFF), "value not exactly representable in bf16"
    return (bits >> 16).astype(np.uint16)


@lru_cache(maxsize=1)
def _pair_table() -> np.ndarray:
    """uint32[65536]: entry ``s << 8 | byte`` = bf16(lo nibble) | bf16(hi nibble) << 16.

    Entries that overflow bf16 (scale 253/254) hold +-inf and scale 255 holds NaN; the decoder
    rejects such inputs before using the table.
    """
    scale = np.ldexp(1.0, np.arange(256, dtype=np.int64) - SCALE_BIAS)  # float64, exact
    codes = np.asarray(FP4_VALUES, dtype=np.float64)
    with np.errstate(over="ignore"):
        vals = (scale[:, None] * codes[None, :]).astype(np.float32)  # [256 scales, 16 codes]
    vals[NAN_SCALE] = np.nan
    per_code = _f32_to_bf16_bits_exact(vals).astype(np.uint32)  # [256, 16]
    byte = np.arange(256)
    table = per_code[:, byte & 0xF] | (per_code[:, byte >> 4] << 16)  # [256 scales, 256 bytes]
    table = np.ascontiguousarray(table.reshape(65536), dtype=np.uint32)
    table.setflags(write=False)
    return table


def _check(blocks: np.ndarray, scales: np.ndarray, name: str) -> None:
    """Validate dtypes, shapes and scale bytes; cheap unless a scale byte exceeds 252."""
    label = f"{name}: " if name else ""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise MXFP4Error(
            f"{label}MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}"
        )
    if blocks.ndim < 2 or blocks.shape[-1] != GROUP_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise MXFP4Error(
            f"{label}shape mismatch: blocks {tuple(blocks.shape)} must be scales shape + (16,), "
            f"scales {tuple(scales.shape)}"
        )
    if scales.size == 0:
        return
    smax = int(scales.max())
    if smax <= MAX_EXACT_SCALE:
        return
    nan = scales == NAN_SCALE
    if nan.any():
        idx = tuple(int(i) for i in np.argwhere(nan)[0])
        raise MXFP4Error(
            f"{label}NaN scale: scale byte {NAN_SCALE} (E8M0 NaN) at scales index {idx}"
        )
    for s, min_code in _OVERFLOW_MIN_MAGNITUDE_CODE.items():
        at_s = scales == s
        if not at_s.any():
            continue
        big = ((blocks & 0x7) >= min_code) | (((blocks >> 4) & 0x7) >= min_code)
        bad = big & at_s[..., None]
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise MXFP4Error(
                f"{label}bf16 overflow: scale byte {s} with a code of magnitude >= "
                f"{FP4_VALUES[min_code]:g} at blocks index {idx} (scale bytes <= "
                f"{MAX_EXACT_SCALE} are always exact)"
            )


def _decode_range(
    blocks: np.ndarray, scales: np.ndarray, out: np.ndarray, table: np.ndarray, lo: int, hi: int
) -> None:
    """Decode groups [lo, hi) of flat blocks [M, 16], scales [M, 1] into out uint32 [M, 16]."""
    idx = np.empty((min(_CHUNK_GROUPS, hi - lo), GROUP_SIZE // 2), dtype=np.uint16)
    for g in range(lo, hi, _CHUNK_GROUPS):
        g2 = min(g + _CHUNK_GROUPS, hi)
        i = idx[: g2 - g]
        np.left_shift(scales[g:g2], 8, out=i, dtype=np.uint16)
        np.bitwise_or(i, blocks[g:g2], out=i)
        np.take(table, i, out=out[g:g2])


def dequantize_to_bf16_bits(
    blocks: np.ndarray,
    scales: np.ndarray,
    out: np.ndarray | None = None,
    *,
    name: str = "",
    threads: int | None = None,
) -> np.ndarray:
    """Decode MXFP4 to bf16 bit patterns, bit-exact.

    blocks uint8 ``[..., G, 16]``, scales uint8 ``[..., G]`` -> uint16 ``[..., G * 32]`` with
    ``W[..., 32g + 2b + j] = FP4[(blocks[..., g, b] >> 4j) & 0xF] * 2^(scales[..., g] - 127)``.
    ``out``: optional C-contiguous uint16 buffer of that shape, written and returned.
    ``name`` names the tensor in error messages; ``threads`` defaults to the CPU count (max 8).
    Raises MXFP4Error on NaN scales (255), bf16 overflow (253/254 with large codes) or shape
    mismatch.
    """
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    _check(blocks, scales, name)
    out_shape = (*scales.shape[:-1], scales.shape[-1] * GROUP_SIZE)
    if out is None:
        out = np.empty(out_shape, dtype=np.uint16)
    elif out.dtype != np.uint16 or out.shape != out_shape or not out.flags.c_contiguous:
        label = f"{name}: " if name else ""
        raise MXFP4Error(
            f"{label}out must be a C-contiguous uint16 array of shape {out_shape}, "
            f"got {out.dtype} {tuple(out.shape)} (c_contiguous={out.flags.c_contiguous})"
        )
    m = scales.size
    if m == 0:
        return out
    flat_blocks = np.ascontiguousarray(blocks).reshape(m, GROUP_SIZE // 2)
    flat_scales = np.ascontiguousarray(scales).reshape(m, 1)
    flat_out = out.reshape(-1).view(np.uint32).reshape(m, GROUP_SIZE // 2)
    table = _pair_table()
    n_threads = default_threads() if threads is None else max(1, threads)
    n_threads = min(n_threads, max(1, m // _CHUNK_GROUPS))
    if n_threads == 1:
        _decode_range(flat_blocks, flat_scales, flat_out, table, 0, m)
        return out
    bounds = np.linspace(0, m, n_threads + 1).astype(np.int64)
    futures = [
        _executor().submit(
            _decode_range, flat_blocks, flat_scales, flat_out, table, int(lo), int(hi)
        )
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    for f in futures:
        f.result()
    return out


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bf16 (nearest, ties to even); return the bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    bits = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = 0x7FC0
    return bits


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) to float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def quantize_from_float(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode float ``[..., K]`` (K % 32 == 0) to MXFP4 ``(blocks [..., K/32, 16], scales)``.

    Per group the scale is the smallest power of two 2^e with max|w| <= 6 * 2^e (clamped to
    scale bytes 0..252), values are rounded to the nearest FP4 code (ties to the smaller
    magnitude code) and clipped to +-6. Deterministic; zeros and negative zeros encode as +0.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 1 or w.shape[-1] % GROUP_SIZE:
        raise MXFP4Error(f"last dimension must be a multiple of {GROUP_SIZE}, got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise MXFP4Error("cannot encode non-finite values as MXFP4")
    groups = w.astype(np.float64).reshape(*w.shape[:-1], w.shape[-1] // GROUP_SIZE, GROUP_SIZE)
    amax = np.abs(groups).max(axis=-1)
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(amax / 6.0))
    e = np.where(amax > 0, e, -SCALE_BIAS)
    # Guard against log2 rounding: make sure amax <= 6 * 2^e and that e is minimal.
    e = np.where(amax > 6.0 * np.ldexp(1.0, e.astype(np.int64)), e + 1, e)
    e = np.where(amax <= 6.0 * np.ldexp(1.0, e.astype(np.int64) - 1), e - 1, e)
    sbyte = np.clip(e + SCALE_BIAS, 0, MAX_EXACT_SCALE).astype(np.uint8)
    scaled = groups / np.ldexp(1.0, sbyte.astype(np.int64) - SCALE_BIAS)[..., None]
    magnitudes = np.asarray(FP4_VALUES[:8], dtype=np.float64)
    mag = np.clip(np.abs(scaled), 0.0, 6.0)
    # Nearest magnitude: first code whose upper midpoint is >= |x| (ties go to smaller).
    mids = (magnitudes[:-1] + magnitudes[1:]) / 2
    code = np.searchsorted(mids, mag, side="left").astype(np.uint8)
    code |= np.where((scaled < 0) & (code > 0), 8, 0).astype(np.uint8)
    pairs = code.reshape(*code.shape[:-1], GROUP_SIZE // 2, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    return np.ascontiguousarray(blocks), np.ascontiguousarray(sbyte)
