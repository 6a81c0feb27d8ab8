"""GPTQ rounding (Frantar et al., 2022) written in exactly MLX's affine format.

`gptq_quantize(weight, hessian, bits=..., group_size=...)` returns what
`mx.quantize(weight_bf16, group_size=..., bits=..., mode="affine")` returns (packed uint32
codes, bf16 scales, bf16 biases; scales and biases as uint16 bf16 bit patterns, numpy
having no bfloat16), but with codes chosen column by column to minimise the layer's output
error ‖X (W − Ŵ)ᵀ‖² on calibration inputs X, whose Hessian H = Σ XᵀX
(`HessianAccumulator`) is all the algorithm sees. Stock `mx.dequantize` and mlx-lm read
the result like any other affine tensor; sizes do not change.

The algorithm, as implemented:
- dead inputs (H[j, j] == 0: never seen) get H[j, j] = 1 and W[:, j] = 0; damping adds
  `damp` × mean(diag H) to the diagonal; U = the upper Cholesky factor of H⁻¹
  (H⁻¹ = UᵀU), computed in float64 without ever forming H⁻¹ (`inverse_hessian_factor`);
- columns are quantized in order; column j's rounding error, divided by U[j, j], is fed
  back into every later column k through U[j, k] (the optimal update of OBS/GPTQ);
- updates are lazy: within a sub-block of `SUB_BLOCK` columns rank-1, then one GEMM into
  the rest of the `block_size` block, then one GEMM into all later columns (mathematically
  the column-by-column sweep, in BLAS-3 operations);
- a group's scale and bias are computed when the sweep reaches its first column, from the
  group's current (error-updated) values, with MLX's formula (`group_params`) and rounded
  to bf16 as stored; the error fed back is the stored value as `mx.dequantize` gives it.

MLX's affine format (mlx/backend/cpu/quantized.cpp, checked byte for byte against
mlx 0.32.4 by tests/test_gptq.py), per group of `group_size` consecutive inputs of a row,
in float32 arithmetic:
    n = 2^bits − 1; mask = |min| > |max|; s = max((max − min) / n, 1e-7), negated if not
    mask; edge = min if mask else max; q0 = rint(edge / s); if q0 != 0: s = edge / q0 and
    b = edge, else b = 0; code = clip(rint((w − b) / s), 0, n); stored s, b: bf16 (nearest
    even). So s is negative when |max| ≥ |min| (code 0 is then the max) and the larger edge
    is hit exactly.
    Dequantized (bf16 scales): bf16(bf16(s·code) + b).
    Packing: each row's codes as one little-endian bit stream, `bits` bits per code, read
    as uint32 words: 8 codes per 3 bytes at 3 bits, per 5 bytes at 5, 4 codes per 3 bytes
    at 6; shape (out, in·bits/32).
mx.quantize computes the codes against the float32 s and b, not the bf16 ones it stores,
and the bf16 rounding of s·code and of the sum makes the stored levels uneven: up to 0.5%
of 4-bit codes and 20% of 8-bit ones are then not the nearest stored value. `codes=
"stored"` (the default) picks the code whose stored value (as mx.dequantize gives it) is
nearest among rint((w − b) / s) ± 1 with the stored s and b (the rounded quotient on
ties, then the lower code); `codes="mlx"` reproduces mx.quantize's choice, so that with
H = I the bytes are mx.quantize's.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from tierquant.core.mxfp4 import from_bf16_bits, to_bf16_bits
from tierquant.core.precision import AFFINE_BITS, GROUP_SIZES
from tierquant.errors import TierquantError

Codes = Literal["stored", "mlx"]
EPS = np.float32(1e-7)  # MLX's floor on a group's scale
# MLX's 1-bit affine has another rule (scale = max − min, bias = min, measured on 0.32.4):
# not reproduced here
GPTQ_BITS = tuple(b for b in AFFINE_BITS if b != 1)
SUB_BLOCK = 16  # columns updated rank-1 at a time; divides every group size
CHOL_BASE = 64  # blocked Cholesky: LAPACK's below this size
TRI_BASE = 32  # triangular inverse: np.linalg.inv below this size


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 (nearest even), as float32."""
    return from_bf16_bits(to_bf16_bits(x))


def group_params(values: np.ndarray, bits: int, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """MLX affine (scale, bias) of each group of `values` along `axis`, in float32 and
    before bf16 rounding (the formula in the module docstring)."""
    v = np.asarray(values, dtype=np.float32)
    n_bins = np.float32(2**bits - 1)
    w_max, w_min = v.max(axis=axis), v.min(axis=axis)
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, EPS)
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, w_min, w_max)
    q0 = np.rint(edge / scale)
    hit = q0 != 0
    scale = np.where(hit, edge / np.where(hit, q0, np.float32(1)), scale)
    bias = np.where(hit, edge, np.float32(0))
    return scale.astype(np.float32), bias.astype(np.float32)


def round_codes(values: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> np.ndarray:
    """clip(rint((values − bias) / scale), 0, 2^bits − 1) in float32, as float32."""
    q = np.rint((np.asarray(values, dtype=np.float32) - bias) / scale)
    return np.minimum(np.maximum(q, 0), np.float32(2**bits - 1))  # np.clip: 3x slower


def dequantize_codes(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """What mx.dequantize gives for `codes` with bf16 `scale` and `bias` (as float32
    values): bf16(bf16(scale · code) + bias)."""
    return bf16_round(bf16_round(scale * np.asarray(codes, dtype=np.float32)) + bias)


def pack_factor(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one MLX pack: 8 codes in 3 or 5 bytes at 3 or 5 bits, 4 codes in
    3 bytes at 6 bits, 32/bits codes in a uint32 otherwise."""
    codes = 8 if bits in (3, 5) else 4 if bits == 6 else 32 // bits
    return codes, codes * bits // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, width) codes < 2^bits packed as mx.quantize packs them: (rows, width·bits/32)
    uint32, each row one little-endian bit stream."""
    rows, width = codes.shape
    per, nbytes = pack_factor(bits)
    c = codes.reshape(rows, width // per, per)
    word = np.zeros((rows, width // per), dtype="<u8")
    for k in range(per):
        word |= c[..., k].astype("<u8") << np.uint64(k * bits)
    raw = word.view(np.uint8).reshape(rows, width // per, 8)[..., :nbytes]
    return np.ascontiguousarray(raw).reshape(rows, -1).view("<u4")


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """The (rows, width) uint8 codes of a packed (rows, width·bits/32) uint32 array."""
    raw = np.ascontiguousarray(packed, dtype="<u4").view(np.uint8)
    rows = raw.shape[0]
    per, nbytes = pack_factor(bits)
    full = np.zeros((rows, raw.shape[1] // nbytes, 8), dtype=np.uint8)
    full[..., :nbytes] = raw.reshape(rows, -1, nbytes)
    word = full.view("<u8")[..., 0]
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((rows, word.shape[1], per), dtype=np.uint8)
    for k in range(per):
        out[..., k] = (word >> np.uint64(k * bits)) & mask
    return out.reshape(rows, -1)


def dequantize(
    packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, *, bits: int, group_size: int
) -> np.ndarray:
    """Ŵ as float32, equal to mx.dequantize's bf16 output (`scales`, `biases`: bf16 bits)."""
    codes = unpack(packed, bits)
    s = np.repeat(from_bf16_bits(scales), group_size, axis=-1)
    b = np.repeat(from_bf16_bits(biases), group_size, axis=-1)
    return dequantize_codes(codes, s, b)


def rtn_quantize(
    weight: np.ndarray, *, bits: int, group_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest of a float32 (out, in) matrix, numpy only: mx.quantize's bytes for
    a bf16-representable `weight` (what gptq_quantize does with H = I, codes="mlx")."""
    out, width = weight.shape
    groups = np.asarray(weight, dtype=np.float32).reshape(out, width // group_size, group_size)
    scale, bias = group_params(groups, bits)
    codes = round_codes(groups, scale[..., None], bias[..., None], bits).reshape(out, width)
    return pack(codes, bits), to_bf16_bits(scale), to_bf16_bits(bias)


class HessianAccumulator:
    """H = Σ XᵀX over batches of input rows X (..., width), in float64, and the number of
    rows (tokens) seen. GPTQ is invariant to H's scale: `sum` serves as is."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.sum = np.zeros((width, width), dtype=np.float64)
        self.tokens = 0

    def add(self, x: np.ndarray) -> None:
        """Add a batch of input rows (any leading shape, last axis = width)."""
        if x.shape[-1] != self.width:
            raise TierquantError(
                f"Hessian: input rows of width {x.shape[-1]}, expected {self.width}"
            )
        rows = np.asarray(x, dtype=np.float64).reshape(-1, self.width)
        self.sum += rows.T @ rows
        self.tokens += rows.shape[0]

    @property
    def mean(self) -> np.ndarray:
        """Σ XᵀX / tokens (zeros before any row)."""
        return self.sum / max(self.tokens, 1)


def objective(weight: np.ndarray, w_hat: np.ndarray, x: np.ndarray) -> float:
    """‖X (W − Ŵ)ᵀ‖² (the layer's squared output error on input rows `x`), in float64."""
    err = np.asarray(weight, dtype=np.float64) - w_hat
    return float(np.sum((np.asarray(x, dtype=np.float64).reshape(-1, err.shape[1]) @ err.T) ** 2))


def hessian_objective(weight: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): `objective` on inputs whose Σ XᵀX is `hessian`."""
    err = np.asarray(weight, dtype=np.float64) - w_hat
    return float(np.sum((err @ hessian) * err))


def lower_triangular_inverse(lower: np.ndarray) -> np.ndarray:
    """L⁻¹ of a lower-triangular L, by blocks: [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0],
    [−D⁻¹ C A⁻¹, D⁻¹]] (GEMMs; numpy has no trtri)."""
    n = lower.shape[0]
    if n <= TRI_BASE:
        return np.tril(np.linalg.inv(lower))
    h = n // 2
    a_inv = lower_triangular_inverse(lower[:h, :h])
    d_inv = lower_triangular_inverse(lower[h:, h:])
    out = np.zeros_like(lower)
    out[:h, :h] = a_inv
    out[h:, h:] = d_inv
    out[h:, :h] = -(d_inv @ (lower[h:, :h] @ a_inv))
    return out


def cholesky_inverse(h: np.ndarray) -> np.ndarray:
    """M⁻¹ for the lower Cholesky factor M of a symmetric positive definite `h`, by
    blocks: with M11 = chol(A), M21 = B M11⁻ᵀ, M22 = chol(C − M21 M21ᵀ),
    (M⁻¹)21 = −M22⁻¹ M21 M11⁻¹. GEMMs (4n³/3 flops) but for LAPACK's Cholesky on
    blocks of ≤ CHOL_BASE, below the size where OpenBLAS threads it (which here, on
    busy cores, made a 2880² Cholesky take 4 s and a 128² one 0.1 s)."""
    n = h.shape[0]
    if n <= CHOL_BASE:
        return lower_triangular_inverse(np.linalg.cholesky(h))
    k = n // 2
    i11 = cholesky_inverse(h[:k, :k])
    m21 = h[k:, :k] @ i11.T
    i22 = cholesky_inverse(h[k:, k:] - m21 @ m21.T)
    out = np.zeros_like(h)
    out[:k, :k] = i11
    out[k:, k:] = i22
    out[k:, :k] = -(i22 @ (m21 @ i11))
    return out


def inverse_hessian_factor(hessian: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """U, upper triangular, with UᵀU = (H + damp·mean(diag H)·I)⁻¹ in float64, dead
    inputs (zero diagonal) first given H[j, j] = 1 as GPTQ does.

    With J the reversal, J H J = M Mᵀ (M lower) gives H = (J M J)(J M J)ᵀ and so
    U = J M⁻¹ J: one blocked Cholesky-and-inverse, no H⁻¹ formed."""
    h = np.array(hessian, dtype=np.float64)
    diag = np.einsum("ii->i", h)  # a view: writes go to h
    diag[diag == 0] = 1.0
    diag += damp * float(np.mean(diag))
    try:
        m_inv = cholesky_inverse(np.ascontiguousarray(h[::-1, ::-1]))
    except np.linalg.LinAlgError as e:
        raise TierquantError(
            f"Hessian ({h.shape[0]}x{h.shape[1]}) is not positive definite even with "
            f"damp={damp}: use a larger damp or more calibration tokens"
        ) from e
    return np.ascontiguousarray(m_inv[::-1, ::-1])


def check_inputs(
    weight: np.ndarray, hessian: np.ndarray, bits: int, group_size: int, damp: float, block: int
) -> None:
    """Raise TierquantError naming what is wrong with gptq_quantize's arguments."""
    if weight.ndim != 2:
        raise TierquantError(f"GPTQ: weight must be a matrix (out, in), got shape {weight.shape}")
    width = weight.shape[1]
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise TierquantError(f"GPTQ: Hessian must be square, got shape {hessian.shape}")
    if hessian.shape[0] != width:
        raise TierquantError(
            f"GPTQ: Hessian is {hessian.shape[0]}x{hessian.shape[1]} but the weight's input "
            f"width (last axis) is {width}"
        )
    if isinstance(bits, bool) or bits not in GPTQ_BITS:
        raise TierquantError(
            f"GPTQ: bits {bits!r} not supported; use one of {', '.join(map(str, GPTQ_BITS))} "
            "(MLX affine has no 7; its 1-bit rule is not reproduced)"
        )
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise TierquantError(
            f"GPTQ: group size {group_size!r} not supported; MLX affine group sizes are "
            f"{', '.join(map(str, GROUP_SIZES))}"
        )
    if width % group_size:
        raise TierquantError(
            f"GPTQ: input width {width} is not a multiple of the group size {group_size}"
        )
    if block <= 0 or block % group_size:
        raise TierquantError(
            f"GPTQ: block size {block} must be a positive multiple of the group size {group_size}"
        )
    if not damp >= 0:
        raise TierquantError(f"GPTQ: damp must be >= 0, got {damp!r}")
    if not (np.isfinite(weight).all() and np.isfinite(hessian).all()):
        raise TierquantError("GPTQ: weight or Hessian holds NaN or infinity")


class _Group:
    """One group's stored (bf16) scale and bias per row and its rounding rule:
    `quantize(w)` gives a column's codes and their stored values (a table lookup)."""

    def __init__(self, values: np.ndarray, bits: int, codes: Codes) -> None:
        scale, bias = group_params(values, bits, axis=0)
        self.scale_bits, self.bias_bits = to_bf16_bits(scale), to_bf16_bits(bias)
        stored = from_bf16_bits(self.scale_bits), from_bf16_bits(self.bias_bits)
        self.against = stored if codes == "stored" else (scale, bias)
        self.nearest = codes == "stored"
        self.rising = stored[0] > 0
        self.bits = bits
        rows = values.shape[1]
        levels = np.arange(2**bits, dtype=np.float32)[:, None]
        self.table = dequantize_codes(levels, *stored).ravel()  # [code * rows + row]
        self.row = np.arange(rows, dtype=np.intp)

    def quantize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes as uint8, their stored values as float32) of one column `w`."""
        q = round_codes(w, *self.against, self.bits).astype(np.intp)
        value = self.table[q * self.row.size + self.row]
        if self.nearest:
            q, value = self._nearest(w, q, value)
        return q.astype(np.uint8), value

    def _nearest(
        self, w: np.ndarray, q: np.ndarray, value: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """q, or its neighbour on w's side when that one's stored value is strictly
        nearer to `w`, and the stored value: bf16 rounding of s·q and of the sum makes
        the levels uneven, so the rounded quotient is not always the nearest. (Levels
        are monotone in the code, rising with it where s > 0.)"""
        d = w - value
        step = np.where((d > 0) == self.rising, 1, -1)
        c = np.clip(q + step, 0, 2**self.bits - 1)
        other = self.table[c * self.row.size + self.row]
        closer = np.abs(w - other) < np.abs(d)
        return np.where(closer, c, q), np.where(closer, other, value)


def _sweep(
    wt: np.ndarray, u: np.ndarray, bits: int, group_size: int, block: int, codes: Codes
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ's column sweep over transposed weights `wt` (in, out), updated in place, with
    U (`u`, in the working dtype); (codes (in, out), scale bits, bias bits (groups, out))."""
    width, rows = wt.shape
    q_all = np.empty((width, rows), dtype=np.uint8)
    scales = np.empty((width // group_size, rows), dtype=np.uint16)
    biases = np.empty_like(scales)
    update = np.empty((max(width - block, 0), rows), dtype=wt.dtype)  # reused by each block
    group: _Group | None = None
    for i1 in range(0, width, block):
        i2 = min(i1 + block, width)
        err = np.empty((i2 - i1, rows), dtype=wt.dtype)
        for s1 in range(i1, i2, SUB_BLOCK):
            s2 = min(s1 + SUB_BLOCK, i2)
            for i in range(s1, s2):
                if i % group_size == 0:  # every earlier column's update has landed
                    group = _Group(wt[i : i + group_size], bits, codes)
                    scales[i // group_size] = group.scale_bits
                    biases[i // group_size] = group.bias_bits
                assert group is not None
                q_all[i], w_hat = group.quantize(wt[i])
                e = err[i - i1]
                np.subtract(wt[i], w_hat, out=e)
                e /= u[i, i]
                wt[i + 1 : s2] -= u[i, i + 1 : s2, None] * e
            if s2 < i2:
                wt[s2:i2] -= u[s1:s2, s2:i2].T @ err[s1 - i1 : s2 - i1]
        if i2 < width:
            rest = update[: width - i2]
            np.matmul(u[i1:i2, i2:].T, err, out=rest)
            wt[i2:] -= rest
    return q_all, scales, biases


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    *,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    codes: Codes = "stored",
    dtype: type[np.floating] = np.float32,
    factor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of `weight` (out, in) against `hessian` (in, in; Σ XᵀX of its inputs):
    (packed uint32 (out, in·bits/32), scales, biases (out, in/group_size) as bf16 bits),
    the shapes and packing mx.quantize returns.

    `codes`: the code whose stored value is nearest ("stored") or mx.quantize's rounding
    against the float32 scale and bias ("mlx"), see the module docstring; `dtype`: the
    working precision of the sweep (float64 for tests); U is always computed in float64.
    `factor`: `inverse_hessian_factor(hessian, damp)` when already made: the rows of a
    matrix are independent given H, so a tall matrix (lm_head) is rounded in row chunks
    that share one factor."""
    weight = np.asarray(weight)
    hessian = np.asarray(hessian)
    check_inputs(weight, hessian, bits, group_size, damp, block_size)
    if factor is not None and factor.shape != hessian.shape:
        raise TierquantError(f"GPTQ: factor is {factor.shape}, the Hessian {hessian.shape}")
    u = (inverse_hessian_factor(hessian, damp) if factor is None else factor).astype(dtype)
    wt = np.array(weight.T, dtype=dtype, order="C")
    wt[np.einsum("ii->i", hessian) == 0] = 0  # dead inputs, as GPTQ does
    q, scales, biases = _sweep(wt, u, bits, group_size, block_size, codes)
    return pack(q.T, bits), np.ascontiguousarray(scales.T), np.ascontiguousarray(biases.T)


def gptq_flops(out: int, width: int) -> float:
    """Floating-point operations of gptq_quantize, counted analytically: out·in·(in − 1)
    for the error feedback (each column's error into each later column, one multiply-add
    per row) and 2·in³/3 for the factor (a Cholesky and a triangular inverse, in³/3
    each: what the factor needs, not the 4·in³/3 our GEMM blocking spends)."""
    return float(out) * width * (width - 1) + 2 * float(width) ** 3 / 3
