"""tierquant.core.gptq against its oracles: mx.quantize's bytes when there is nothing to
compensate (H = I), a plain float64 GPTQ written here column by column, stock
mx.dequantize of its output, RTN's objective on calibration and held-out inputs, and
errors naming bad input."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from tierquant.core import gptq
from tierquant.core.mxfp4 import from_bf16_bits, to_bf16_bits
from tierquant.errors import TierquantError

BITS = (2, 3, 4, 5, 6, 8)


def bf16_weights(rng: np.random.Generator, out: int, width: int) -> np.ndarray:
    """Random bf16-representable float32 weights with heavy-ish tails, as checkpoints have."""
    w = rng.standard_t(5, (out, width)).astype(np.float32) * 0.02
    return from_bf16_bits(to_bf16_bits(w))


def inputs(rng: np.random.Generator, tokens: int, width: int, basis: np.ndarray) -> np.ndarray:
    """Correlated input rows: a low-rank mix (`basis`: rank x width) plus noise, a few
    outlier channels 20x larger (the same channels for every call with one `basis`)."""
    x = rng.standard_normal((tokens, basis.shape[0])) @ basis
    x += 0.3 * rng.standard_normal((tokens, width))
    x[:, : max(1, width // 64)] *= 20.0
    return x.astype(np.float32)


def mx_rtn(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, ...]:
    """mx.quantize of the bf16 of `w`: (packed, scale bits, bias bits) in numpy."""
    q, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=group_size, bits=bits)
    return np.array(q), np.array(s.view(mx.uint16)), np.array(b.view(mx.uint16))


def mx_dequantize(parts: tuple[np.ndarray, ...], bits: int, group_size: int) -> np.ndarray:
    """Stock mx.dequantize of numpy (packed, scale bits, bias bits), as float32."""
    q, s, b = parts
    s_mx, b_mx = mx.array(s).view(mx.bfloat16), mx.array(b).view(mx.bfloat16)
    out = mx.dequantize(mx.array(q), s_mx, b_mx, group_size=group_size, bits=bits)
    return np.array(out.astype(mx.float32))


def hat(parts: tuple[np.ndarray, ...], bits: int, group_size: int) -> np.ndarray:
    """gptq.dequantize of (packed, scale bits, bias bits)."""
    return gptq.dequantize(*parts, bits=bits, group_size=group_size)


def edge_rows(w: np.ndarray, group_size: int) -> np.ndarray:
    """`w` with MLX's edge cases in its first groups: all zero, constant, below eps,
    all negative, all positive, one outlier, |min| == |max|."""
    w = w.copy()
    g = group_size
    w[0, :g] = 0.0
    w[1, :g] = 0.5
    w[2, :g] = 1e-8
    w[3, :g] = -np.abs(w[3, :g]) - 0.01
    w[4, :g] = np.abs(w[4, :g]) + 0.01
    w[5, 0] = 3.0
    w[6, :g] = np.where(np.arange(g) % 2, 0.25, -0.25)
    return from_bf16_bits(to_bf16_bits(w))


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", BITS)
def test_identity_hessian_gives_mx_quantize_bytes(bits, group_size):
    """With H = I no error is fed back (U is diagonal): with codes="mlx" the packed
    weights, scales and biases are mx.quantize's, byte for byte, edge groups included;
    rtn_quantize (numpy) gives the same."""
    w = edge_rows(bf16_weights(np.random.default_rng(bits * 1000 + group_size), 32, 256), 32)
    ref = mx_rtn(w, bits, group_size)
    ours = gptq.gptq_quantize(w, np.eye(256), bits=bits, group_size=group_size, codes="mlx")
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    for a, b in zip(gptq.rtn_quantize(w, bits=bits, group_size=group_size), ref, strict=True):
        np.testing.assert_array_equal(a, b)


def nearest_codes(w: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> np.ndarray:
    """By brute force over every code: the code whose value as mx.dequantize gives it
    (bf16 `scale`, `bias` as float32, broadcast against `w`) is nearest to `w`; ties to
    the one nearest the rounded quotient, then the lower."""
    levels = np.arange(2**bits, dtype=np.float32)
    values = gptq.dequantize_codes(levels, scale[..., None], bias[..., None])
    dist = np.abs(w[..., None].astype(np.float64) - values)
    q0 = gptq.round_codes(w, scale, bias, bits)[..., None]
    tie = np.broadcast_to(np.abs(levels - q0), dist.shape)
    order = np.lexsort((np.broadcast_to(levels, dist.shape), tie, dist), axis=-1)
    return order[..., 0].astype(np.uint8)


@pytest.mark.parametrize("bits", BITS)
def test_stored_codes_are_the_nearest_stored_value(bits):
    """codes="stored" (the default) keeps mx.quantize's scales and biases and picks, for
    every weight, the code whose stored value is nearest to it (brute force over all
    codes); mx.quantize's codes (computed against the float32 scale) sometimes are not,
    so its total error is never smaller."""
    g = 64
    w = edge_rows(bf16_weights(np.random.default_rng(bits), 64, 256), g)
    ref = mx_rtn(w, bits, g)
    ours = gptq.gptq_quantize(w, np.eye(256), bits=bits, group_size=g)
    np.testing.assert_array_equal(ours[1], ref[1])
    np.testing.assert_array_equal(ours[2], ref[2])
    s = np.repeat(from_bf16_bits(ref[1]), g, axis=1)
    b = np.repeat(from_bf16_bits(ref[2]), g, axis=1)
    np.testing.assert_array_equal(gptq.unpack(ours[0], bits), nearest_codes(w, s, b, bits))
    w_ours = hat(ours, bits, g)
    w_mx = mx_dequantize(ref, bits, g)
    assert (np.abs(w - w_ours) <= np.abs(w - w_mx)).all()


def reference_gptq(
    w: np.ndarray, h: np.ndarray, bits: int, group_size: int, damp: float = 0.01
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textbook GPTQ in float64, one column at a time, every later column updated at
    once, U from an explicit inverse: (codes (out, in), scale bits, bias bits). The
    format helpers (group_params, dequantize_codes) are tierquant.core.gptq's, which the
    mx.quantize oracle above pins down; the code choice is the brute-force one above."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, uᵀu = h⁻¹
    out, width = w.shape
    codes = np.zeros((out, width), dtype=np.uint8)
    scales, biases = [], []
    for j in range(width):
        if j % group_size == 0:
            scale, bias = gptq.group_params(w[:, j : j + group_size], bits)
            s_b, b_b = to_bf16_bits(scale), to_bf16_bits(bias)
            scales.append(s_b)
            biases.append(b_b)
            stored = from_bf16_bits(s_b), from_bf16_bits(b_b)
        q = nearest_codes(w[:, j].astype(np.float32), *stored, bits)
        codes[:, j] = q
        e = (w[:, j] - gptq.dequantize_codes(q, *stored)) / u[j, j]
        w[:, j + 1 :] -= np.outer(e, u[j, j + 1 :])
    return codes, np.stack(scales, axis=1), np.stack(biases, axis=1)


REFERENCE_CASES = [(3, 32, 24, 256), (4, 64, 16, 192), (2, 128, 16, 256), (8, 32, 8, 128)]


@pytest.mark.parametrize(("bits", "group_size", "out", "width"), REFERENCE_CASES)
def test_matches_plain_float64_reference(bits, group_size, out, width):
    """Lazy blocks (block 128, sub-blocks of 16), the reversed-Cholesky factor and the
    transposed sweep change only the rounding of float64 sums: at dtype=float64 every
    code, scale and bias equals the textbook sweep's. (Exact equality holds unless a
    value lands within ~1e-13 relative of a float32 rounding midpoint — seeds fixed.)
    One input is dead (never seen)."""
    rng = np.random.default_rng(bits + width)
    w = bf16_weights(rng, out, width)
    x = inputs(rng, 4 * width, width, rng.standard_normal((width // 4, width)))
    x[:, 5] = 0.0
    h = x.astype(np.float64).T @ x
    ref_codes, ref_s, ref_b = reference_gptq(w, h, bits, group_size)
    q, s, b = gptq.gptq_quantize(w, h, bits=bits, group_size=group_size, dtype=np.float64)
    np.testing.assert_array_equal(gptq.unpack(q, bits), ref_codes)
    np.testing.assert_array_equal(s, ref_s)
    np.testing.assert_array_equal(b, ref_b)


@pytest.mark.parametrize(("bits", "group_size", "out", "width"), REFERENCE_CASES[:2])
def test_float32_sweep_is_the_reference_up_to_rounding(bits, group_size, out, width):
    """In float32 (the default) a value within float32 rounding (~1e-7 relative) of a
    code boundary can round the other way, and the changed error then moves that row's
    later columns: at least 97% of codes equal the float64 reference's and the
    objective is within 2% of it."""
    rng = np.random.default_rng(bits + width)
    w = bf16_weights(rng, out, width)
    x = inputs(rng, 4 * width, width, rng.standard_normal((width // 4, width)))
    h = x.astype(np.float64).T @ x
    ref_codes, ref_s, ref_b = reference_gptq(w, h, bits, group_size)
    ours = gptq.gptq_quantize(w, h, bits=bits, group_size=group_size)
    assert np.mean(gptq.unpack(ours[0], bits) == ref_codes) >= 0.97
    ref_hat = hat((gptq.pack(ref_codes, bits), ref_s, ref_b), bits, group_size)
    ours_obj = gptq.hessian_objective(w, hat(ours, bits, group_size), h)
    assert ours_obj == pytest.approx(gptq.hessian_objective(w, ref_hat, h), rel=0.02)


@pytest.mark.parametrize(("bits", "group_size"), list(zip(BITS, [32, 64, 128] * 2, strict=True)))
def test_mx_dequantize_reads_what_the_objective_uses(bits, group_size):
    """Stock mx.dequantize of gptq_quantize's output is the Ŵ of gptq.dequantize (the
    one objective and the error feedback use), bit for bit."""
    rng = np.random.default_rng(10 + bits)
    w = bf16_weights(rng, 24, 256)
    x = inputs(rng, 512, 256, rng.standard_normal((32, 256)))
    h = x.astype(np.float64).T @ x
    g = group_size
    parts = gptq.gptq_quantize(w, h, bits=bits, group_size=g)
    np.testing.assert_array_equal(mx_dequantize(parts, bits, g), hat(parts, bits, g))


def objective_cases() -> list[tuple[int, int, int, int, int]]:
    """(seed, bits, group size, out, width): 20 matrices."""
    shapes = [(64, 128), (32, 256), (48, 192), (96, 128)]
    return [
        (seed, bits, g, *shapes[seed % len(shapes)])
        for seed, (bits, g) in enumerate([(3, 32), (4, 64), (3, 64), (4, 32), (2, 64)] * 4)
    ]


def test_objective_at_most_rtn_on_calibration_and_mostly_held_out():
    """On structured random cases (correlated inputs, outlier channels; calibration
    4x the width in tokens) GPTQ's ‖X (W − Ŵ)ᵀ‖² is ≤ mx.quantize's on the calibration
    inputs every time, and on held-out inputs of the same distribution in ≥ 90% of them."""
    cases = objective_cases()
    held_out_wins = 0
    for seed, bits, g, out, width in cases:
        rng = np.random.default_rng(seed)
        w = bf16_weights(rng, out, width)
        basis = rng.standard_normal((width // 8, width)) * rng.uniform(0.2, 2.0, width)
        calib, held = inputs(rng, 4 * width, width, basis), inputs(rng, 4 * width, width, basis)
        acc = gptq.HessianAccumulator(width)
        for batch in np.array_split(calib, 3):
            acc.add(batch)
        w_gptq = hat(gptq.gptq_quantize(w, acc.sum, bits=bits, group_size=g), bits, g)
        w_rtn = mx_dequantize(mx_rtn(w, bits, g), bits, g)
        calib_gptq, calib_rtn = gptq.objective(w, w_gptq, calib), gptq.objective(w, w_rtn, calib)
        assert calib_gptq <= calib_rtn, (seed, bits, g, calib_gptq, calib_rtn)
        assert gptq.hessian_objective(w, w_gptq, acc.sum) == pytest.approx(calib_gptq, rel=1e-6)
        held_out_wins += gptq.objective(w, w_gptq, held) <= gptq.objective(w, w_rtn, held)
    assert held_out_wins >= 0.9 * len(cases)


def test_row_chunks_with_a_shared_factor_equal_the_whole_matrix():
    """Rows are independent given H: rounding a tall matrix (lm_head) in row chunks
    with one precomputed factor gives exactly the whole matrix's bytes; a factor of the
    wrong shape is refused."""
    rng = np.random.default_rng(3)
    w = bf16_weights(rng, 96, 128)
    basis = rng.standard_normal((16, 128))
    acc = gptq.HessianAccumulator(128)
    acc.add(inputs(rng, 512, 128, basis))
    whole = gptq.gptq_quantize(w, acc.sum, bits=4, group_size=64)
    u = gptq.inverse_hessian_factor(acc.sum, 0.01)
    chunks = [
        gptq.gptq_quantize(w[r : r + 32], acc.sum, bits=4, group_size=64, factor=u)
        for r in range(0, 96, 32)
    ]
    for part, chunked in zip(whole, zip(*chunks, strict=True), strict=True):
        assert np.array_equal(part, np.concatenate(chunked))
    with pytest.raises(TierquantError, match="factor"):
        gptq.gptq_quantize(w, acc.sum, bits=4, group_size=64, factor=u[:64, :64])


def test_hessian_accumulator_sums_batches_in_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50, 32)).astype(np.float32)
    acc = gptq.HessianAccumulator(32)
    acc.add(x[0])
    acc.add(x[1:])
    flat = x.reshape(-1, 32).astype(np.float64)
    assert acc.tokens == 150 and acc.sum.dtype == np.float64
    np.testing.assert_allclose(acc.sum, flat.T @ flat, rtol=1e-12)
    np.testing.assert_allclose(acc.mean, flat.T @ flat / 150, rtol=1e-12)
    with pytest.raises(TierquantError, match="width 16, expected 32"):
        acc.add(x[0, :, :16])


def test_inverse_hessian_factor_is_upper_cholesky_of_damped_inverse():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((700, 600))
    h = x.T @ x
    h[7, :] = h[:, 7] = 0.0  # a dead input
    u = gptq.inverse_hessian_factor(h, damp=0.05)  # 600 > CHOL_BASE: the block recursion
    assert np.array_equal(u, np.triu(u)) and (np.diag(u) > 0).all()
    damped = h.copy()
    damped[7, 7] = 1.0
    damped += 0.05 * np.mean(np.diag(damped)) * np.eye(600)
    np.testing.assert_allclose(u.T @ u @ damped, np.eye(600), atol=1e-9)


@pytest.mark.parametrize(
    ("weight_shape", "hessian_shape", "bits", "group_size", "message"),
    [
        ((8, 64), (64, 32), 4, 32, "Hessian must be square"),
        ((8, 64), (128, 128), 4, 32, "weight's input width"),
        ((8, 64), (64, 64), 7, 32, "bits 7 not supported"),
        ((8, 64), (64, 64), 1, 32, "bits 1 not supported"),
        ((8, 64), (64, 64), 4, 16, "group size 16 not supported"),
        ((8, 96), (96, 96), 4, 64, "input width 96 is not a multiple of the group size 64"),
        ((64,), (64, 64), 4, 32, "weight must be a matrix"),
    ],
)
def test_bad_input_names_what_is_wrong(weight_shape, hessian_shape, bits, group_size, message):
    w = np.zeros(weight_shape, dtype=np.float32)
    with pytest.raises(TierquantError, match=message):
        gptq.gptq_quantize(w, np.eye(*hessian_shape), bits=bits, group_size=group_size)


def test_bad_numbers_name_what_is_wrong():
    w, h = np.zeros((8, 64), dtype=np.float32), np.eye(64)
    with pytest.raises(TierquantError, match="block size 48"):
        gptq.gptq_quantize(w, h, bits=4, group_size=32, block_size=48)
    with pytest.raises(TierquantError, match="damp"):
        gptq.gptq_quantize(w, h, bits=4, group_size=32, damp=-1.0)
    with pytest.raises(TierquantError, match="NaN"):
        gptq.gptq_quantize(w, np.full((64, 64), np.nan), bits=4, group_size=32)
    with pytest.raises(TierquantError, match="not positive definite"):
        gptq.gptq_quantize(w, -np.eye(64), bits=4, group_size=32, damp=0.0)
