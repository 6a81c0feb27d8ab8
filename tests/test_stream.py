"""The layer-streamed forward against the whole-model oracle (stock mlx_lm.load).

Per-token logits equal within float32 rounding, and every validate metric equal to
>= 5 significant digits, for the original (mxfp4 experts, HF names), the float
conversion and an assembled mixed-precision model.
"""

from __future__ import annotations

import numpy as np
import oracle
import pytest

from tierquant.config import EvalSet
from tierquant.quality import evalset, evaluate
from tierquant.quality.klstats import summarize
from tierquant.quality.stream import StreamedModel, compute_dtype

BATCH = 4


@pytest.fixture(scope="module")
def tokens(tiny_original):
    return evalset.eval_windows(EvalSet(num_windows=8, window_length=64), tiny_original)


@pytest.fixture(scope="module")
def seed_model(models):
    return models()[1]


def _streamed_logits(model_dir, tokens, vocab_chunk):
    with StreamedModel(model_dir, compute_dtype=compute_dtype()) as sm:
        hidden = sm.forward(tokens, batch_size=BATCH)[:, :-1]
        chunks = list(sm.logit_chunks(hidden, vocab_chunk=vocab_chunk))
    assert [s for s, _ in chunks] == list(range(0, 1024, vocab_chunk))
    return np.concatenate([np.array(c) for _, c in chunks], axis=1)


@pytest.mark.parametrize("which", ["original", "float", "seed"])
def test_streamed_logits_equal_the_whole_model(
    which, tiny_original, tiny_float, seed_model, tokens
):
    model_dir = {"original": tiny_original, "float": tiny_float, "seed": seed_model}[which]
    whole = np.array(oracle.whole_logits(oracle.load_whole(model_dir), tokens, BATCH))
    streamed = _streamed_logits(model_dir, tokens, vocab_chunk=300)
    assert streamed.shape == whole.shape == (8 * 63, 1024)
    scale = np.abs(whole).max()
    assert np.abs(streamed - whole).max() <= 1e-5 * scale, np.abs(streamed - whole).max()


def test_streamed_metrics_equal_the_whole_model(tiny_original, seed_model, tokens):
    # Reference: streamed with a 300-id vocab slice vs the oracle's one slice.
    ref_s = evaluate.streamed_reference(
        tiny_original, tokens, top_k=64, batch_size=BATCH, vocab_chunk=300
    )
    whole = oracle.whole_chunks(oracle.load_whole(tiny_original), tokens, BATCH)
    ref_w = evaluate.compute_reference(
        whole, tokens, top_k=64, vocab_size=1024, dtype=compute_dtype()
    )
    np.testing.assert_allclose(ref_s.topk_logp, ref_w.topk_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref_s.nll, ref_w.nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref_s.tail_logp, ref_w.tail_logp, rtol=1e-5, atol=1e-5)
    assert np.mean(ref_s.topk_ids == ref_w.topk_ids) > 0.99  # near-ties may swap order
    assert np.array_equal(ref_s.argmax, ref_w.argmax)
    # The seed model against the (oracle's) reference, both ways.
    streamed = summarize(
        evaluate.streamed_token_stats(seed_model, ref_w, batch_size=BATCH, vocab_chunk=300),
        ref_w,
    )
    model_chunks = oracle.whole_chunks(oracle.load_whole(seed_model), tokens, BATCH)
    whole_m = summarize(evaluate.token_stats(model_chunks, ref_w), ref_w)
    assert streamed.keys() == whole_m.keys()
    assert whole_m["kld_mean"] > 0.01  # a real difference, not two zeros
    # Slicing the vocabulary changes each log-sum-exp by float32 summation order, which
    # can move a float32 log-prob by an ulp (~1e-6 at |log p| ~ 8-16): every metric
    # agrees to 5 significant digits or to 5e-6 nats, whichever is looser (only the
    # smallest per-token KLDs, e.g. kld_min, need the absolute part).
    off = {}
    for key, value in whole_m.items():
        if isinstance(value, float):
            if streamed[key] != pytest.approx(value, rel=1e-5, abs=5e-6):
                off[key] = (streamed[key], value)
        else:
            assert streamed[key] == value, key
    assert not off, off


def test_weight_overrides_replace_only_what_they_name(tiny_float, tokens):
    with StreamedModel(tiny_float, compute_dtype=compute_dtype()) as sm:
        h0 = sm.embed(tokens)
        plain = np.array(sm.run_layer(0, h0, batch_size=BATCH))
        name = "model.layers.0.self_attn.q_proj.weight"
        same = sm.layer_weights(0)[name]
        again = np.array(sm.run_layer(0, h0, batch_size=BATCH, weight_overrides={name: same}))
        zeroed = np.array(sm.run_layer(0, h0, batch_size=BATCH, weight_overrides={name: same * 0}))
        after = np.array(sm.run_layer(0, h0, batch_size=BATCH))
        with pytest.raises(Exception, match="not a parameter of layer 0"):
            sm.run_layer(0, h0, batch_size=BATCH, weight_overrides={"model.norm.weight": same})
    assert np.array_equal(plain, again) and np.array_equal(plain, after)
    assert not np.allclose(plain, zeroed)
