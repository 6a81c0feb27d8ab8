"""The measure stage's damage against an independent oracle: where the head-projected
measure is exact (the last layer's groups, lm_head), it equals the end-to-end KL of the
whole model (stock mlx-lm load) with that group fake-quantized."""

from __future__ import annotations

import numpy as np
import pytest

from tierquant.calibration import calibration_windows
from tierquant.config import CalibrationConfig, EvalConfig


@pytest.fixture(scope="module")
def measured(tiny_original, tiny_float):
    from tierquant.allocate import parse_candidates
    from tierquant.measure import measure_damage

    tokens = calibration_windows(
        CalibrationConfig(num_windows=2, window_length=32), EvalConfig(), tiny_original
    )
    cands = parse_candidates([2, 3, "mxfp4"], 64)
    return (
        tokens,
        cands,
        measure_damage(float_dir=tiny_float, tokens=tokens, candidates=cands, batch_size=2),
    )


def _kl_mean(p_logits, q_logits) -> float:
    import mlx.core as mx

    lp = p_logits - mx.logsumexp(p_logits, axis=-1, keepdims=True)
    lq = q_logits - mx.logsumexp(q_logits, axis=-1, keepdims=True)
    kl = mx.sum(mx.exp(lp) * (lp - lq), axis=-1)
    return float(np.mean(np.array(kl, dtype=np.float64)))


def _end_to_end(float_dir, tokens, names, precision) -> float:
    """Mean KL of the whole float model with `names` fake-quantized, vs unquantized."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from tierquant.measure import fake_quantize
    from tierquant.oracle import load_whole, whole_logits

    model = load_whole(float_dir)
    ref = whole_logits(model, tokens, 2)
    params = dict(tree_flatten(model.parameters()))
    from tierquant.checkpoint import Checkpoint

    with Checkpoint(float_dir) as ckpt:  # the stored bf16 weights, as quantize reads them
        updates = []
        for n in names:
            raw = mx.array(ckpt.read_rows(n, 0, ckpt.info(n).shape[0])).view(mx.bfloat16)
            updates.append((n, fake_quantize(raw, precision).astype(params[n].dtype)))
    model.load_weights(updates, strict=False)
    return _kl_mean(ref, whole_logits(model, tokens, 2))


@pytest.mark.parametrize("group", ["layers.5.experts_down", "layers.5.attn_vo", "lm_head"])
def test_exact_where_the_projection_is_exact(measured, tiny_float, group):
    from tierquant.allocate import allocation_groups
    from tierquant.gptoss import shape_of_checkpoint

    tokens, cands, damage = measured
    groups = {g.name: g for g in allocation_groups(shape_of_checkpoint(tiny_float))[0]}
    assert group in groups
    p3 = next(p for p in cands if p.mode == "affine" and p.bits == 3)
    want = _end_to_end(tiny_float, tokens, [w.name for w in groups[group].weights], p3)
    assert damage[group][p3.label] == pytest.approx(want, rel=2e-3, abs=1e-6)


def test_damage_shape_and_order(measured):
    _, cands, damage = measured
    for name, d in damage.items():
        assert all(v >= 0 for v in d.values())
        if not name.endswith("attn_qk"):  # q/k on 64 tokens is within its noise
            assert d["2-bit g64"] > d["3-bit g64"], name
        if name.endswith(("gate_up", "down")):
            assert d["mxfp4"] == 0.0
        else:
            assert "mxfp4" not in d
