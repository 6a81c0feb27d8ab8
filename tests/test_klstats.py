"""llama.cpp-style statistics against a brute-force computation on a hand-made case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tierquant.quality.klstats import DP_PERCENTILES, KLD_PERCENTILES, kl_statistics

KLD = [0.0, 0.5, 0.1, 2.0, 0.25, 0.05, 1.0, 0.3]
NLL_Q = [1.0, 2.5, 0.2, 3.0, 1.1, 0.7, 2.2, 1.4]
NLL_B = [0.9, 2.0, 0.3, 2.1, 1.0, 0.6, 1.5, 1.3]
SAME = [True, False, True, False, True, True, False, True]


def _mean(xs):
    return sum(xs) / len(xs)


def _stderr(xs):
    """llama.cpp: sqrt((E[x²] − E[x]²) / (n − 1))."""
    m = _mean(xs)
    return math.sqrt((_mean([x * x for x in xs]) - m * m) / (len(xs) - 1))


def _percentile(xs, q):
    """Linear interpolation between order statistics at rank q/100 · (n − 1)."""
    s = sorted(xs)
    rank = q / 100 * (len(s) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


@pytest.fixture(scope="module")
def stats():
    return kl_statistics(
        kld=np.array(KLD),
        nll_model=np.array(NLL_Q),
        nll_reference=np.array(NLL_B),
        agree=np.array(SAME),
    )


def test_kld_statistics(stats):
    assert stats["kld_mean"] == pytest.approx(_mean(KLD))
    assert stats["kld_mean_stderr"] == pytest.approx(_stderr(KLD))
    assert stats["kld_median"] == pytest.approx((0.25 + 0.3) / 2)
    assert stats["kld_max"] == 2.0 and stats["kld_min"] == 0.0
    for key, q in KLD_PERCENTILES.items():
        assert stats[f"kld_{key}"] == pytest.approx(_percentile(KLD, q)), key
    assert set(KLD_PERCENTILES) == {"p99_9", "p99", "p95", "p90", "p10", "p5", "p1", "p0_1"}


def test_delta_p_statistics(stats):
    dp = [math.exp(-q) - math.exp(-b) for q, b in zip(NLL_Q, NLL_B, strict=True)]
    assert stats["dp_mean"] == pytest.approx(_mean(dp))
    assert stats["dp_mean_stderr"] == pytest.approx(_stderr(dp))
    sq = [d * d for d in dp]
    rms = math.sqrt(_mean(sq))
    assert stats["dp_rms"] == pytest.approx(rms)
    assert stats["dp_rms_stderr"] == pytest.approx(0.5 / rms * _stderr(sq))
    assert stats["dp_max"] == pytest.approx(max(dp)) and stats["dp_min"] == pytest.approx(min(dp))
    assert stats["dp_median"] == pytest.approx(_percentile(dp, 50))
    for key, q in DP_PERCENTILES.items():
        assert stats[f"dp_{key}"] == pytest.approx(_percentile(dp, q)), key


def test_same_top_and_perplexity_statistics(stats):
    n = len(SAME)
    p = sum(SAME) / n
    assert stats["top1_agreement"] == p == 5 / 8
    assert stats["top1_agreement_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    mq, mb = _mean(NLL_Q), _mean(NLL_B)
    sq, sb = _stderr(NLL_Q), _stderr(NLL_B)
    cov = (_mean([a * b for a, b in zip(NLL_Q, NLL_B, strict=True)]) - mq * mb) / (n - 1)
    assert stats["ppl_model"] == pytest.approx(math.exp(mq))
    assert stats["ppl_model_stderr"] == pytest.approx(math.exp(mq) * sq)
    assert stats["ppl_reference"] == pytest.approx(math.exp(mb))
    assert stats["ppl_reference_stderr"] == pytest.approx(math.exp(mb) * sb)
    assert stats["ln_ppl_ratio"] == pytest.approx(mq - mb)
    assert stats["ln_ppl_ratio_stderr"] == pytest.approx(math.sqrt(sq**2 + sb**2 - 2 * cov))
    assert stats["ppl_ratio"] == pytest.approx(math.exp(mq - mb))
    assert stats["ppl_ratio_stderr"] == pytest.approx(
        math.exp(mq - mb) * stats["ln_ppl_ratio_stderr"]
    )
    # llama.cpp's Cor(ln PPL(Q), ln PPL(base)) is Pearson's correlation of the NLLs.
    assert stats["ln_ppl_correlation"] == pytest.approx(np.corrcoef(NLL_Q, NLL_B)[0, 1])
