"""The synthetic checkpoint has the real gpt-oss layout and loads in stock mlx-lm."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests.conftest import tiny_spec
from tierquant.core.checkpoint import Checkpoint
from tierquant.core.gptoss import GptOssShape, hf_tensor_specs, verify_original
from tierquant.core.mxfp4 import dequantize_to_bf16_bits
from tierquant.source.synthetic import write_synthetic_checkpoint
from tierquant.source.tokenizer import special_token_ids

REAL_120B_CONFIG_KEYS = {
    "architectures",
    "attention_bias",
    "attention_dropout",
    "eos_token_id",
    "experts_per_token",
    "head_dim",
    "hidden_act",
    "hidden_size",
    "initial_context_length",
    "initializer_range",
    "intermediate_size",
    "layer_types",
    "max_position_embeddings",
    "model_type",
    "num_attention_heads",
    "num_experts_per_tok",
    "num_hidden_layers",
    "num_key_value_heads",
    "num_local_experts",
    "output_router_logits",
    "pad_token_id",
    "quantization_config",
    "rms_norm_eps",
    "rope_scaling",
    "rope_theta",
    "router_aux_loss_coef",
    "sliding_window",
    "swiglu_limit",
    "tie_word_embeddings",
    "transformers_version",
    "use_cache",
    "vocab_size",
}


def test_layout_matches_gpt_oss(tiny_original):
    config = json.loads((tiny_original / "config.json").read_text())
    assert set(config) == REAL_120B_CONFIG_KEYS
    assert "torch_dtype" not in config
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
    assert config["layer_types"][0] == "sliding_attention"
    shape = GptOssShape.from_config(config)
    ckpt = verify_original(tiny_original)
    assert len(ckpt.tensors) == 19 * shape.num_hidden_layers + 3
    shards = sorted(p.name for p in tiny_original.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert shards[0] == f"model-00000-of-{len(shards) - 1:05d}.safetensors"
    index = json.loads((tiny_original / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in hf_tensor_specs(shape))
    ids = special_token_ids(tiny_spec().num_regular_tokens)
    generation = json.loads((tiny_original / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]]
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        assert (tiny_original / name).is_file()


def test_deterministic_from_seed(tiny_original, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    write_synthetic_checkpoint(again, tiny_spec())
    names = sorted(p.name for p in tiny_original.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (tiny_original / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    other.mkdir()
    write_synthetic_checkpoint(other, tiny_spec(seed=1))
    shard = sorted(tiny_original.glob("model-*.safetensors"))[1].name
    assert (other / shard).read_bytes() != (tiny_original / shard).read_bytes()


@pytest.mark.parametrize("kernel", ["Prescott", "Haswell"])
def test_same_bytes_whatever_the_blas_kernel(tiny_original, tmp_path, kernel):
    """The fitted embedding/head come from an SVD, whose singular vectors' signs depend on
    the BLAS kernel OpenBLAS picks for the CPU: another machine must still write the same
    bytes (or the shared DVC cache misses). OPENBLAS_CORETYPE forces another kernel
    here; it is ignored where numpy does not use OpenBLAS (macOS: Accelerate)."""
    import os
    import subprocess
    import sys

    out = tmp_path / kernel
    out.mkdir()
    code = (
        "import sys; from pathlib import Path; from tests.conftest import tiny_spec; "
        "from tierquant.source.synthetic import write_synthetic_checkpoint; "
        "write_synthetic_checkpoint(Path(sys.argv[1]), tiny_spec())"
    )
    env = {**os.environ, "OPENBLAS_CORETYPE": kernel}
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code, str(out)], env=env, cwd=root, check=True)
    for path in sorted(tiny_original.iterdir()):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_any_shape(tmp_path):
    write_synthetic_checkpoint(
        tmp_path,
        tiny_spec(num_hidden_layers=3, num_local_experts=4, hidden_size=64, fit_to_corpus=False),
    )
    ckpt = verify_original(tmp_path)
    assert ckpt.info("model.layers.2.mlp.experts.down_proj_blocks").shape == (4, 64, 4, 16)


def test_random_head_is_as_peaked_as_the_fitted_one(tmp_path):
    """Without fit_to_corpus the lm_head is random; its logits on unit-RMS hidden states
    (what the final RMSNorm gives) have mean entropy near TARGET_ENTROPY, not the
    near-zero entropy of standard-normal head rows (logit std sqrt(hidden))."""
    from tierquant.core.mxfp4 import from_bf16_bits
    from tierquant.source.synthetic import TARGET_ENTROPY

    spec = tiny_spec(num_hidden_layers=2, num_local_experts=2, hidden_size=256, fit_to_corpus=False)
    write_synthetic_checkpoint(tmp_path, spec)
    with Checkpoint(tmp_path) as ckpt:
        head = from_bf16_bits(ckpt.read("lm_head.weight"))
    hidden = np.random.default_rng(1).standard_normal((64, head.shape[1]))
    logits = hidden @ head.T
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(p + 1e-30)).sum(axis=1).mean()
    assert 0.75 * TARGET_ENTROPY < entropy < 1.33 * TARGET_ENTROPY, entropy


@pytest.fixture(scope="module")
def loaded(tiny_original):
    from mlx_lm import load

    return load(str(tiny_original))


def test_mlx_lm_builds_mxfp4_experts_from_interleaved_rows(tiny_original, loaded):
    model, _ = loaded
    experts = model.model.layers[1].mlp.experts
    assert type(experts.gate_proj).__name__ == "QuantizedSwitchLinear"
    assert experts.gate_proj.mode == "mxfp4" and experts.up_proj.mode == "mxfp4"
    ckpt = Checkpoint(tiny_original)
    prefix = "model.layers.1.mlp.experts.gate_up_proj"
    rows = dequantize_to_bf16_bits(ckpt.read(prefix + "_blocks"), ckpt.read(prefix + "_scales"))
    for module, offset in ((experts.gate_proj, 0), (experts.up_proj, 1)):
        dq = mx.dequantize(
            module.weight, module.scales, group_size=32, bits=4, mode="mxfp4", dtype=mx.bfloat16
        )
        np.testing.assert_array_equal(np.array(dq.view(mx.uint16)), rows[:, offset::2, :])
    bias = ckpt.read(prefix + "_bias")
    np.testing.assert_array_equal(np.array(experts.up_proj.bias.view(mx.uint16)), bias[:, 1::2])


def test_next_token_distributions_are_peaked_and_generation_works(loaded):
    from mlx_lm import generate

    from tierquant.quality.evalset import load_corpus

    model, tokenizer = loaded
    ids = tokenizer.encode(load_corpus()[:4000])[:256]
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    entropy = -(mx.exp(logp) * logp).sum(-1)
    uniform = np.log(tiny_spec().num_regular_tokens)
    # Far from uniform (6.9 nats), and not a one-hot either.
    assert 0.5 < entropy.mean().item() < 0.6 * uniform
    assert mx.exp(logp).max(-1).mean().item() > 0.2
    text = generate(model, tokenizer, prompt="It was the best of times", max_tokens=12)
    assert len(tokenizer.encode(text)) >= 5
