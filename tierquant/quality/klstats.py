"""The statistics llama.cpp's `perplexity --kl-divergence` prints, from per-token values.

Semantics follow llama.cpp's perplexity.cpp: a mean's uncertainty is
`sqrt(var / (n - 1))` with `var = E[x²] − E[x]²` (the population variance); the
"same top p" error is `sqrt(p (1 − p) / (n − 1))`; PPL = exp(mean NLL) with error
`PPL · σ(mean NLL)`; ln(PPL(Q)/PPL(base)) = mean NLL_Q − mean NLL_base with error
`sqrt(σ_Q² + σ_base² − 2 cov)`, `cov = (E[ab] − E[a]E[b]) / (n − 1)`; the correlation of
ln PPL is `cov / (σ_Q σ_base)`; RMS Δp = sqrt(mean Δp²) with error
`σ(mean Δp²) / (2 RMS)`. Percentiles interpolate linearly between order statistics.
Δp is the model's probability of the actual next token minus the reference's (both
exp(−NLL); the reference stores its NLL). Values are fractions (llama.cpp prints
Δp and "same top p" in percent).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# name suffix -> percentile, as llama.cpp prints them
KLD_PERCENTILES = {"p99_9": 99.9, "p99": 99, "p95": 95, "p90": 90, "p10": 10, "p5": 5, "p1": 1}
KLD_PERCENTILES["p0_1"] = 0.1
DP_PERCENTILES = {
    "p99_9": 99.9,
    "p99": 99,
    "p95": 95,
    "p90": 90,
    "p75": 75,
    "p25": 25,
    "p10": 10,
    "p5": 5,
    "p1": 1,
    "p0_1": 0.1,
}


def mean_and_uncertainty(x: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean ± error of a per-token quantity."""
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    mean = float(x.mean())
    var = float(np.mean(x * x) - mean * mean)
    return mean, math.sqrt(max(var, 0.0) / (n - 1)) if n > 1 else 0.0


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    """llama.cpp's covariance of two means: (E[ab] − E[a]E[b]) / (n − 1)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    n = a.size
    if n < 2:
        return 0.0
    return float(np.mean(a * b) - a.mean() * b.mean()) / (n - 1)


def kl_statistics(
    *, kld: np.ndarray, nll_model: np.ndarray, nll_reference: np.ndarray, agree: np.ndarray
) -> dict[str, float]:
    """KLD, Δp, same-top-p and PPL statistics (see the module docstring for formulas)."""
    kld = np.asarray(kld, dtype=np.float64).ravel()
    nll_q = np.asarray(nll_model, dtype=np.float64).ravel()
    nll_b = np.asarray(nll_reference, dtype=np.float64).ravel()
    same = np.asarray(agree, dtype=np.float64).ravel()
    n = kld.size
    out: dict[str, float] = {}

    out["kld_mean"], out["kld_mean_stderr"] = mean_and_uncertainty(kld)
    out["kld_median"] = float(np.median(kld))
    for key, q in KLD_PERCENTILES.items():
        out[f"kld_{key}"] = float(np.percentile(kld, q))
    out["kld_max"], out["kld_min"] = float(kld.max()), float(kld.min())

    dp = np.exp(-nll_q) - np.exp(-nll_b)
    out["dp_mean"], out["dp_mean_stderr"] = mean_and_uncertainty(dp)
    mse, mse_err = mean_and_uncertainty(dp * dp)
    out["dp_rms"] = math.sqrt(mse)
    out["dp_rms_stderr"] = 0.5 / out["dp_rms"] * mse_err if out["dp_rms"] > 0 else 0.0
    out["dp_median"] = float(np.median(dp))
    for key, q in DP_PERCENTILES.items():
        out[f"dp_{key}"] = float(np.percentile(dp, q))
    out["dp_max"], out["dp_min"] = float(dp.max()), float(dp.min())

    p = float(same.mean())
    out["top1_agreement"] = p
    out["top1_agreement_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0

    ln_q, ln_q_err = mean_and_uncertainty(nll_q)
    ln_b, ln_b_err = mean_and_uncertainty(nll_b)
    cov = covariance(nll_q, nll_b)
    out["ppl_model"], out["ppl_model_stderr"] = math.exp(ln_q), math.exp(ln_q) * ln_q_err
    out["ppl_reference"] = math.exp(ln_b)
    out["ppl_reference_stderr"] = math.exp(ln_b) * ln_b_err
    out["ln_ppl_ratio"] = ln_q - ln_b
    out["ln_ppl_ratio_stderr"] = math.sqrt(max(ln_q_err**2 + ln_b_err**2 - 2 * cov, 0.0))
    out["ppl_ratio"] = out["ppl_model"] / out["ppl_reference"]
    out["ppl_ratio_stderr"] = out["ppl_ratio"] * out["ln_ppl_ratio_stderr"]
    denom = ln_q_err * ln_b_err
    out["ln_ppl_correlation"] = cov / denom if denom > 0 else 1.0
    return out


def summarize(stats: Any, ref: Any) -> dict[str, Any]:
    """The DVC metrics of a TokenStats against its Reference (tierquant.quality.evaluate)."""
    kld = stats.kld.astype(np.float64)
    per_window = kld.mean(axis=1)
    metrics: dict[str, Any] = kl_statistics(
        kld=kld, nll_model=stats.nll, nll_reference=ref.nll, agree=stats.agree
    )
    metrics.update(
        {
            "window_kld_min": float(per_window.min()),
            "window_kld_median": float(np.median(per_window)),
            "window_kld_max": float(per_window.max()),
            "window_kld_std": float(per_window.std()),
            "kld_tail_bound_mean": float(stats.tail_bound.astype(np.float64).mean()),
            "reference_tail_mass_mean": float(ref.meta["tail_mass_mean"]),
            "top_k": int(ref.meta["top_k"]),
            "tokens": int(kld.size),
            "windows": int(kld.shape[0]),
            "compute_dtype": str(ref.meta.get("compute_dtype", "bfloat16")),
        }
    )
    return metrics


def row_lse64(x) -> np.ndarray:
    """float64 log Σ exp of each row of a float32 mx array (-inf for an all -inf row): the
    one log-sum-exp of a vocab slice's logits, for reference, validate and measure."""
    import mlx.core as mx

    m = mx.max(x, axis=-1)
    safe = mx.where(mx.isinf(m), 0.0, m)
    total = mx.sum(mx.exp(x - safe[:, None]), axis=-1)
    mx.eval(safe, total)
    with np.errstate(divide="ignore"):
        return np.array(safe).astype(np.float64) + np.log(np.array(total).astype(np.float64))
