"""convert: exact MXFP4 → bf16 in mlx-lm names, loadable as is, and bad input refused."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from tierquant.core.checkpoint import INDEX_NAME, Checkpoint
from tierquant.core.gptoss import mlx_float_specs, shape_of_checkpoint
from tierquant.errors import TierquantError
from tierquant.source.convert import convert_checkpoint

FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def reference_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The MXFP4 formula (docs/gpt-oss-format.md) in float64, then exact truncation to bf16."""
    low, high = blocks & 0xF, blocks >> 4
    codes = np.stack([low, high], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = np.ldexp(FP4[codes], scales.astype(np.int64)[..., None] - 127)
    as_f32 = values.astype(np.float32)
    assert (as_f32.astype(np.float64) == values).all()
    bits = as_f32.view(np.uint32)
    assert not (bits & 0xFFFF).any(), "value not exactly representable in bf16"
    return (bits >> 16).astype(np.uint16).reshape(*blocks.shape[:-2], -1)


def test_layout_names_and_files(tiny_float, tiny_original):
    shape = shape_of_checkpoint(tiny_original)
    with Checkpoint(tiny_float) as ckpt:
        got = {n: (i.dtype, i.shape) for n, i in ckpt.tensors.items()}
    assert got == {s.name: (s.dtype, s.shape) for s in mlx_float_specs(shape)}
    config = json.loads((tiny_float / "config.json").read_text())
    assert "quantization_config" not in config
    assert len(list(tiny_float.glob("model-*-of-*.safetensors"))) > 1
    assert (tiny_float / INDEX_NAME).is_file()
    for name in ("tokenizer.json", "generation_config.json", "chat_template.jinja"):
        assert (tiny_float / name).read_bytes() == (tiny_original / name).read_bytes()


def test_experts_bit_exact_and_split_into_gate_and_up(tiny_float, tiny_original):
    with Checkpoint(tiny_original) as src, Checkpoint(tiny_float) as dst:
        shape = shape_of_checkpoint(tiny_original)
        for layer in range(shape.num_hidden_layers):
            hf = f"model.layers.{layer}.mlp.experts"
            gate_up = reference_dequantize(
                src.read(f"{hf}.gate_up_proj_blocks"), src.read(f"{hf}.gate_up_proj_scales")
            )
            np.testing.assert_array_equal(dst.read(f"{hf}.gate_proj.weight"), gate_up[:, 0::2])
            np.testing.assert_array_equal(dst.read(f"{hf}.up_proj.weight"), gate_up[:, 1::2])
            down = reference_dequantize(
                src.read(f"{hf}.down_proj_blocks"), src.read(f"{hf}.down_proj_scales")
            )
            np.testing.assert_array_equal(dst.read(f"{hf}.down_proj.weight"), down)
            bias = src.read(f"{hf}.gate_up_proj_bias")
            np.testing.assert_array_equal(dst.read(f"{hf}.gate_proj.bias"), bias[:, 0::2])
            np.testing.assert_array_equal(dst.read(f"{hf}.up_proj.bias"), bias[:, 1::2])
        for name in src.tensors:
            if ".experts." not in name:
                np.testing.assert_array_equal(dst.read(name), src.read(name), err_msg=name)


def test_same_logits_and_greedy_continuation_as_the_mxfp4_original(tiny_float, tiny_original):
    from mlx_lm import generate, load

    prompt = "It is a truth universally acknowledged, that a single man"
    results = []
    for path in (tiny_original, tiny_float):  # one model in memory at a time
        model, tokenizer = load(str(path))
        # MLX's CPU gather_mm (bf16 SwitchLinear) only runs in float32, so both models
        # compute in float32 here; their weights are the same bf16 values either way.
        model.set_dtype(mx.float32)
        ids = tokenizer.encode(prompt)
        logits = model(mx.array([ids]))[0, -1]
        text = generate(model, tokenizer, prompt=prompt, max_tokens=16)
        results.append((np.array(logits), text))
        del model
    (lo, text_o), (lf, text_f) = results
    np.testing.assert_allclose(lf, lo, rtol=1e-4, atol=1e-4 * np.abs(lo).max())
    assert lf.argmax() == lo.argmax()
    assert text_f == text_o


def test_output_is_deterministic(tiny_float, tiny_original, tmp_path):
    again = tmp_path / "again"
    convert_checkpoint(tiny_original, again, max_shard_bytes=2_000_000)
    for p in tiny_float.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.fixture
def broken(tiny_original, tmp_path):
    return shutil.copytree(tiny_original, tmp_path / "original")


def _poke(root, name, index, value):
    with Checkpoint(root) as ckpt:
        info = ckpt.info(name)
    with open(info.path, "r+b") as f:
        f.seek(info.offset + index)
        f.write(bytes([value]))


def _convert_fails(src, tmp_path, pattern):
    out = tmp_path / "float"
    with pytest.raises(TierquantError, match=pattern):
        convert_checkpoint(src, out, max_shard_bytes=2_000_000)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".float")]


def test_nan_scale_is_named(broken, tmp_path):
    name = "model.layers.3.mlp.experts.down_proj_scales"
    _poke(broken, name, 17, 255)
    _convert_fails(broken, tmp_path, rf"{name}.*255")


def _rewrite_header(root, name, new_name=None, **entry_changes):
    """Rename or reshape one tensor in its shard header (data left as is)."""
    with Checkpoint(root) as ckpt:
        path = ckpt.info(name).path
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    entry = header.pop(name)
    new_name = new_name or name
    entry.update(entry_changes)
    header[new_name] = entry
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    index = json.loads((root / INDEX_NAME).read_text())
    index["weight_map"][new_name] = index["weight_map"].pop(name)
    (root / INDEX_NAME).write_text(json.dumps(index))


def test_missing_scales_tensor_is_named(broken, tmp_path):
    name = "model.layers.2.mlp.experts.gate_up_proj_scales"
    _rewrite_header(broken, name, new_name=name.replace("_scales", "_scalez"))
    _convert_fails(broken, tmp_path, rf"{name}.*missing")


def test_blocks_and_scales_shapes_disagree(broken, tmp_path):
    name = "model.layers.1.mlp.experts.down_proj_scales"
    with Checkpoint(broken) as ckpt:
        e, rows, groups = ckpt.info(name).shape
    _rewrite_header(broken, name, shape=[e, groups, rows])
    _convert_fails(broken, tmp_path, rf"{name}.*implies")


def test_expert_count_disagreeing_with_config(broken, tmp_path):
    config = json.loads((broken / "config.json").read_text())
    config["num_local_experts"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    _convert_fails(broken, tmp_path, r"mlp\.(router|experts).*implies")
