"""Tests for the MXFP4 -> bf16 codec against an independent exact reference."""

from __future__ import annotations

from fractions import Fraction
from functools import cache

import numpy as np
import pytest

from tierquant.core.mxfp4 import (
    FP4_VALUES,
    MXFP4Error,
    dequantize_to_bf16_bits,
    from_bf16_bits,
    quantize_from_float,
)
from tierquant.errors import TierquantError

# e2m1 decoded from its bit fields (sign, 2-bit exponent, 1-bit mantissa), not from a table.


def _e2m1(code: int) -> Fraction:
    sign = -1 if code & 8 else 1
    exp = (code >> 1) & 3
    man = code & 1
    if exp == 0:  # subnormal: 0 or 0.5
        return sign * Fraction(man, 2)
    return sign * Fraction(2) ** (exp - 1) * (1 + Fraction(man, 2))


def _bf16_bits_exact(value: Fraction, negative: bool) -> int:
    """Exact Fraction -> bf16 bits (1 sign, 8 exponent, 7 mantissa); fails if not exact."""
    sign = 0x8000 if negative else 0
    mag = abs(value)
    if mag == 0:
        return sign
    e = mag.numerator.bit_length() - mag.denominator.bit_length()
    while Fraction(2) ** e > mag:
        e -= 1
    while Fraction(2) ** (e + 1) <= mag:
        e += 1
    if e >= -126:
        assert e <= 127, "overflow"
        frac = mag / Fraction(2) ** e - 1
        man = frac * 128
        assert man.denominator == 1, "not exact in bf16"
        return sign | ((e + 127) << 7) | int(man)
    man = mag / Fraction(2) ** -133  # subnormal: man * 2^-133, man < 128
    assert man.denominator == 1 and man < 128, "not exact in bf16"
    return sign | int(man)


@cache
def _ref_value_bits(scale: int, code: int) -> int:
    value = _e2m1(code) * Fraction(2) ** (scale - 127)
    return _bf16_bits_exact(value, negative=bool(code & 8))


def _reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Slow per-element decode straight from the formula."""
    lead = scales.shape
    out = np.zeros((*lead[:-1], lead[-1] * 32), dtype=np.uint16)
    for idx in np.ndindex(*lead):
        s = int(scales[idx])
        for b in range(16):
            byte = int(blocks[idx][b])
            for j in range(2):
                out[(*idx[:-1], 32 * idx[-1] + 2 * b + j)] = _ref_value_bits(
                    s, (byte >> 4 * j) & 15
                )
    return out


def test_fp4_table_matches_e2m1_fields() -> None:
    assert len(FP4_VALUES) == 16
    for code, v in enumerate(FP4_VALUES):
        assert Fraction(v) == _e2m1(code)
        assert np.signbit(v) == bool(code & 8)


def test_every_scale_and_byte_bit_exact() -> None:
    # Every scale byte 0..252 paired with every byte value (all codes in both nibble positions).
    rng = np.random.default_rng(1)
    s = np.repeat(np.arange(253, dtype=np.uint8), 16)  # 16 groups per scale
    blocks = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (253, 1))
    perm = rng.permutation(s.size)
    s, blocks = s[perm], blocks[perm]
    scales = s.reshape(11, 23, 16)
    blocks = blocks.reshape(11, 23, 16, 16)
    got = dequantize_to_bf16_bits(blocks, scales)
    assert got.dtype == np.uint16 and got.shape == (11, 23, 512)
    np.testing.assert_array_equal(got, _reference(blocks, scales))


def test_subnormal_and_extreme_values() -> None:
    blocks = np.zeros((2, 1, 16), dtype=np.uint8)
    blocks[:, 0, 0] = 0x73  # 1.5 then 6.0
    blocks[:, 0, 1] = 0x01  # 0.5 then 0
    scales = np.array([[0], [252]], dtype=np.uint8)
    got = dequantize_to_bf16_bits(blocks, scales)
    assert got[0, 0] == 0x0060  # 1.5 * 2^-127 = 0.75 * 2^-126: bf16 subnormal
    assert got[0, 1] == 0x0140  # 6 * 2^-127 = 1.5 * 2^-125: smallest exponents, normal
    assert got[0, 2] == 0x0020  # 0.5 * 2^-127 = 2^-128: bf16 subnormal
    assert from_bf16_bits(got[1, 1:2])[0] == np.float32(6.0 * 2.0**125)
    assert from_bf16_bits(got[0, 2:3])[0] == np.float32(2.0**-128)
    assert got[0, 3] == 0 and got[1, 31] == 0


def test_random_leading_shapes_threads_and_out() -> None:
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (3, 5, 7, 16), dtype=np.uint8)
    scales = rng.integers(0, 253, (3, 5, 7), dtype=np.uint8)
    ref = _reference(blocks, scales)
    np.testing.assert_array_equal(dequantize_to_bf16_bits(blocks, scales), ref)
    np.testing.assert_array_equal(dequantize_to_bf16_bits(blocks[0], scales[0]), ref[0])
    np.testing.assert_array_equal(dequantize_to_bf16_bits(blocks[0, 0], scales[0, 0]), ref[0, 0])
    out = np.full((3, 5, 224), 0xFFFF, dtype=np.uint16)
    res = dequantize_to_bf16_bits(blocks, scales, out=out)
    assert res is out
    np.testing.assert_array_equal(out, ref)
    # A slice of a bigger buffer (as when writing into a file-backed array).
    big = np.zeros((4, 5, 224), dtype=np.uint16)
    dequantize_to_bf16_bits(blocks, scales, out=big[1:])
    np.testing.assert_array_equal(big[1:], ref)
    assert not big[0].any()


def test_large_input_multithreaded_matches_single() -> None:
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (2, 600, 90, 16), dtype=np.uint8)  # 108k groups
    scales = rng.integers(0, 253, (2, 600, 90), dtype=np.uint8)
    one = dequantize_to_bf16_bits(blocks, scales, threads=1)
    many = dequantize_to_bf16_bits(blocks, scales, threads=4)
    np.testing.assert_array_equal(one, many)
    # Spot-check rows against the reference.
    for e, r in [(0, 0), (1, 599), (1, 300)]:
        np.testing.assert_array_equal(one[e, r], _reference(blocks[e, r], scales[e, r]))


def test_non_contiguous_inputs() -> None:
    rng = np.random.default_rng(4)
    blocks = rng.integers(0, 256, (4, 6, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (4, 6), dtype=np.uint8)
    got = dequantize_to_bf16_bits(blocks[::2], scales[::2])
    np.testing.assert_array_equal(got, _reference(blocks[::2], scales[::2]))


def test_matches_mx_dequantize() -> None:
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (2, 64, 8, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (2, 64, 8), dtype=np.uint8)
    w = mx.array(blocks).view(mx.uint32).flatten(-2)  # [2, 64, 32]: 4 uint32 per block
    deq = mx.dequantize(w, mx.array(scales), group_size=32, bits=4, mode="mxfp4", dtype=mx.bfloat16)
    expected = np.array(deq.view(mx.uint16))
    np.testing.assert_array_equal(dequantize_to_bf16_bits(blocks, scales), expected)


def test_nan_scale_raises_with_name_and_index() -> None:
    blocks = np.zeros((2, 3, 16), dtype=np.uint8)
    scales = np.full((2, 3), 127, dtype=np.uint8)
    scales[1, 2] = 255
    name = "model.layers.3.mlp.experts.down_proj_scales"
    with pytest.raises(MXFP4Error, match=r"NaN scale.*255.*\(1, 2\)") as exc:
        dequantize_to_bf16_bits(blocks, scales, name=name)
    assert name in str(exc.value)
    assert isinstance(exc.value, TierquantError)


def test_shape_mismatch_raises_with_name() -> None:
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    with pytest.raises(MXFP4Error, match="shape mismatch") as exc:
        dequantize_to_bf16_bits(
            np.zeros((2, 3, 16), np.uint8), np.zeros((2, 4), np.uint8), name=name
        )
    assert name in str(exc.value)
    with pytest.raises(MXFP4Error, match="shape mismatch"):
        dequantize_to_bf16_bits(np.zeros((2, 3, 8), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(MXFP4Error, match="uint8"):
        dequantize_to_bf16_bits(np.zeros((2, 3, 16), np.int8), np.zeros((2, 3), np.uint8))


def test_bad_out_raises() -> None:
    blocks = np.zeros((2, 3, 16), np.uint8)
    scales = np.zeros((2, 3), np.uint8)
    with pytest.raises(MXFP4Error, match="out must be"):
        dequantize_to_bf16_bits(blocks, scales, out=np.zeros((2, 95), np.uint16))
    with pytest.raises(MXFP4Error, match="out must be"):
        dequantize_to_bf16_bits(blocks, scales, out=np.zeros((2, 96), np.float32))
    with pytest.raises(MXFP4Error, match="out must be"):
        dequantize_to_bf16_bits(blocks, scales, out=np.zeros((2, 192), np.uint16)[:, ::2])


@pytest.mark.parametrize(
    ("scale", "ok_byte", "bad_byte"),
    [(253, 0x55, 0x60), (253, 0xDD, 0xE0), (254, 0x33, 0x04), (254, 0xBB, 0xC0)],
)
def test_overflow_at_253_254(scale: int, ok_byte: int, bad_byte: int) -> None:
    blocks = np.zeros((1, 4, 16), np.uint8)
    scales = np.array([[127, scale, 127, 127]], np.uint8)
    blocks[0, 1, :] = ok_byte  # largest finite magnitudes: exact, no error
    got = dequantize_to_bf16_bits(blocks, scales)
    np.testing.assert_array_equal(got, _reference(blocks, scales))
    blocks[0, 1, 5] = bad_byte
    with pytest.raises(MXFP4Error, match=rf"overflow.*{scale}.*\(0, 1, 5\)") as exc:
        dequantize_to_bf16_bits(blocks, scales, name="t.scales")
    assert "t.scales" in str(exc.value)


def test_quantize_round_trip() -> None:
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((3, 8, 128)) * np.exp(rng.uniform(-20, 20, (3, 8, 1)))).astype(
        np.float32
    )
    blocks, scales = quantize_from_float(w)
    assert blocks.shape == (3, 8, 4, 16) and blocks.dtype == np.uint8
    assert scales.shape == (3, 8, 4) and scales.dtype == np.uint8
    blocks2, scales2 = quantize_from_float(w)
    np.testing.assert_array_equal(blocks, blocks2)
    np.testing.assert_array_equal(scales, scales2)
    back = from_bf16_bits(dequantize_to_bf16_bits(blocks, scales)).reshape(w.shape)
    groups = w.reshape(3, 8, 4, 32)
    err = np.abs(back.reshape(groups.shape) - groups).max(axis=-1)
    amax = np.abs(groups).max(axis=-1)
    # FP4 grid spacing is at most 2 (between 4 and 6) in units of 2^e, and 6 * 2^e < 2 * amax.
    assert np.all(err <= amax / 3 + 1e-30)
    # Max of each group is hit to within half the top spacing.
    rel = np.abs(back.reshape(groups.shape)).max(axis=-1) / amax
    assert np.all((rel > 0.66) & (rel <= 1.34))


def test_quantize_exact_values_round_trip_exactly() -> None:
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 16, (5, 64))
    exps = rng.integers(-100, 100, (5, 2, 1))
    w = (np.array(FP4_VALUES)[codes].reshape(5, 2, 32) * np.ldexp(1.0, exps)).reshape(5, 64)
    w[:, ::32] = 6.0 * np.ldexp(1.0, exps[:, :, 0])  # pin each group's scale
    blocks, scales = quantize_from_float(w.astype(np.float32))
    back = from_bf16_bits(dequantize_to_bf16_bits(blocks, scales))
    np.testing.assert_array_equal(back, w.astype(np.float32))


def test_quantize_zeros_and_bad_shape() -> None:
    blocks, scales = quantize_from_float(np.zeros((2, 32), np.float32))
    assert not blocks.any()
    assert not dequantize_to_bf16_bits(blocks, scales).any()
    with pytest.raises(MXFP4Error, match="multiple of 32"):
        quantize_from_float(np.zeros((2, 30), np.float32))
