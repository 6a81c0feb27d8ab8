"""The trainer (tierquant.source.train): its forward is stock mlx-lm's gpt_oss on the
exported checkpoint, its export is the exact original layout, and it is deterministic.
Needs the `train` extra (torch); skipped without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the `train` extra (torch) is not installed")

from tests.conftest import tiny_spec  # noqa: E402
from tierquant.core.checkpoint import Checkpoint  # noqa: E402
from tierquant.core.mxfp4 import (  # noqa: E402
    dequantize_to_bf16_bits,
    from_bf16_bits,
    quantize_from_float,
)
from tierquant.source.synthetic import config_json  # noqa: E402
from tierquant.source.train import (  # noqa: E402
    TinyGptOss,
    TrainConfig,
    drop_overlaps,
    export_tensors,
    init_weights,
    model_from_checkpoint,
    mxfp4_fake_quant,
    read_checkpoint,
    setup_determinism,
    train,
    yarn_rope,
)
from tierquant.source.trained import asset_dir, write_trained_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "original"
    out.mkdir()
    write_trained_checkpoint(out, tiny_spec())
    return out


def test_forward_equals_stock_mlx_lm(original):
    """70 tokens (past the 32-token sliding window): the trainer's float32 forward on the
    exported checkpoint and mlx-lm's gpt_oss on data/original agree to float32 rounding."""
    import mlx.core as mx
    from mlx_lm import load

    ids = np.random.default_rng(0).integers(0, 1000, size=(2, 70))
    with torch.no_grad():
        want = model_from_checkpoint(original)(torch.from_numpy(ids))[0].numpy()
    model, _ = load(str(original))
    model.set_dtype(mx.float32)
    got = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_export_reproduces_the_committed_weights():
    """Decoding the asset into the torch model and exporting it again gives the same
    bf16 bytes and the same MXFP4 values (the bytes can differ: a group whose largest
    value rounded down to a smaller code re-encodes at a smaller scale)."""
    raw = read_checkpoint(asset_dir())
    again = export_tensors(model_from_checkpoint(asset_dir()))
    assert raw.keys() == again.keys()
    for name in raw:
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            scales = name.replace("_blocks", "_scales")
            want = dequantize_to_bf16_bits(raw[name], raw[scales])
            got = dequantize_to_bf16_bits(again[name], again[scales])
            assert np.array_equal(want, got), name
        else:
            assert np.array_equal(raw[name], again[name]), name


def test_fake_quant_is_the_exported_encoding():
    w = torch.randn(2, 64, 128) * 0.05
    blocks, scales = quantize_from_float(w.numpy())
    want = from_bf16_bits(dequantize_to_bf16_bits(blocks, scales)).reshape(w.shape)
    w.requires_grad_(True)
    q = mxfp4_fake_quant(w)
    assert np.array_equal(q.detach().numpy(), want)
    q.sum().backward()  # straight through
    assert torch.equal(w.grad, torch.ones_like(w))


def test_yarn_rope_equals_mlx_lm():
    from mlx_lm.models.rope_utils import initialize_rope

    config = config_json(tiny_spec())
    rope = initialize_rope(
        config["head_dim"], config["rope_theta"], False, config["rope_scaling"], 131072
    )
    freqs, mscale = yarn_rope(config)
    assert np.array_equal(np.array(rope._freqs), freqs)
    assert mscale == pytest.approx(rope.mscale, rel=1e-12)


def test_overlapping_paragraphs_are_dropped():
    held_out = "It is a truth universally acknowledged, that a single man in possession"
    docs = [
        (
            "a",
            "Fresh words about whales and ships.\n\nIt is a truth universally "
            "acknowledged, that a single man in possession of a fortune.",
        ),
        ("b", "Other text entirely."),
    ]
    text, dropped = drop_overlaps(docs, held_out)
    assert dropped == ["a paragraph 1"]
    assert "truth" not in text and "whales" in text and "Other" in text


def test_training_is_deterministic():
    """Two short runs from the same seed give identical weights and curves."""
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=40, eval_every=3, qat_fraction=0.5)
    tokens = np.random.default_rng(1).integers(0, 1000, size=4000).astype(np.int32)
    sets = {"val": tokens[:400].reshape(10, 40)}
    runs = []
    for _ in range(2):
        setup_determinism(cfg.seed, cfg.threads)
        model = TinyGptOss(config_json(cfg.shape))
        init_weights(model, cfg.seed)
        curve = train(model, tokens, sets, cfg)
        runs.append((curve, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (c1, w1), (c2, w2) = runs
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in c1] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in c2
    ]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_recorded_figures_are_consistent():
    """training.json's final figures: the model beats the bigram on the eval windows."""
    record = json.loads((asset_dir() / "training.json").read_text())
    exported = record["exported"]
    assert exported["eval_ppl"] < exported["bigram_eval_ppl"]
    assert exported["technical_bits_per_byte"] <= 4.0
    with Checkpoint(asset_dir()) as ckpt:
        assert ckpt.config == config_json(tiny_spec())
