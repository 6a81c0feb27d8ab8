"""quantize + assemble: every module at its tier's bits, a stock mlx-lm model, exact sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests.conftest import build_model
from tierquant.build.quantize import quantize_tier
from tierquant.core.checkpoint import Checkpoint
from tierquant.core.gptoss import Weight
from tierquant.core.precision import check_quantizable, parse_precision
from tierquant.errors import TierquantError


@pytest.fixture(scope="module")
def seed_model(tiny_original, tiny_float, tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("seed"), tiny_original, tiny_float)


def _bits(model) -> dict[str, int | None]:
    return {
        name: getattr(m, "bits", None)
        for name, m in model.named_modules()
        if hasattr(m, "weight") and m.weight.ndim >= 2
    }


def test_every_module_has_its_tiers_bits(seed_model):
    from mlx_lm import load

    config, model_dir, _ = seed_model
    model, _ = load(str(model_dir))
    bits = _bits(model)
    layers = config.model.synthetic.num_hidden_layers
    assert bits["model.embed_tokens"] == 6 and bits["lm_head"] == 6
    for i in range(layers):
        p = f"model.layers.{i}"
        assert bits[f"{p}.mlp.router"] is None  # bf16, not mlx-lm's 8-bit default
        assert type(model.model.layers[i].mlp.router).__name__ == "Linear"
        assert bits[f"{p}.self_attn.v_proj"] == 6 and bits[f"{p}.self_attn.o_proj"] == 6
        edge = i in (0, layers - 1)
        full = config_layer_type(model_dir, i) == "full_attention"
        assert bits[f"{p}.self_attn.q_proj"] == (6 if edge or full else 4)
        assert bits[f"{p}.self_attn.k_proj"] == (6 if edge or full else 4)
        for kind in ("gate_proj", "up_proj", "down_proj"):
            assert bits[f"{p}.mlp.experts.{kind}"] == 3
    assert model.model.layers[0].input_layernorm.weight.dtype == mx.bfloat16


def config_layer_type(model_dir, layer):
    return json.loads((model_dir / "config.json").read_text())["layer_types"][layer]


def test_readme_usage_snippet_generates_text(seed_model):
    from mlx_lm import generate, load

    _, model_dir, _ = seed_model
    model, tokenizer = load(str(model_dir))
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = generate(model, tokenizer, prompt=prompt, max_tokens=16)
    assert len(tokenizer.encode(text)) >= 4


def test_layout_shards_are_linked_and_router_excluded(seed_model):
    _, model_dir, _ = seed_model
    config = json.loads((model_dir / "config.json").read_text())
    q = config["quantization"]
    assert q == config["quantization_config"]
    assert q["model.layers.0.mlp.router"] is False
    assert q["model.layers.2.self_attn.q_proj"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    shards = sorted(model_dir.glob("model-*-of-*.safetensors"))
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    quantized = model_dir.parent / "quantized"
    tier_inodes = {p.stat().st_ino for p in quantized.rglob("*.safetensors")}
    assert {p.stat().st_ino for p in shards} <= tier_inodes  # links, not copies
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    with Checkpoint(model_dir) as ckpt:
        assert set(index["weight_map"]) == set(ckpt.tensors)


def test_predicted_size_equals_measured_to_the_byte(seed_model, tiny_original, tmp_path):
    from tierquant.plan.predict import predict

    config, model_dir, measured = seed_model
    predicted = predict(
        plan_dir=model_dir.parent / "plan",
        original=tiny_original,
        tiers=config.tiers,
        group_size=config.quant.group_size,
        out=tmp_path / "predicted.json",
    )
    with Checkpoint(model_dir) as ckpt:
        written = sum(i.nbytes for i in ckpt.tensors.values())
    assert measured["total"]["bytes"] == written
    assert predicted["total"]["bytes"] == written
    for tier, row in measured["tiers"].items():
        assert predicted["tiers"][tier]["bytes"] == row["bytes"], tier
    assert predicted["original"]["bytes"] == measured["original"]["bytes"]


def test_quantization_errors_are_recorded(seed_model):
    _, model_dir, _ = seed_model
    manifest = json.loads(
        (model_dir.parent / "quantized" / "experts" / "manifest.json").read_text()
    )
    errors = [m["rel_rmse"] for m in manifest["modules"].values()]
    assert all(0.05 < e < 0.5 for e in errors)  # 3-bit: clearly lossy, not garbage
    sensitive = json.loads(
        (model_dir.parent / "quantized" / "sensitive" / "manifest.json").read_text()
    )
    assert max(m["rel_rmse"] for m in sensitive["modules"].values()) < min(errors)  # 6 < 3 bits
    csv = (model_dir.parent / "quant_error.csv").read_text().splitlines()
    assert csv[0] == "module,tier,kind,layer,bits,rel_rmse" and len(csv) > 20


def test_mxfp4_experts_keep_the_original_bytes(tiny_original, tiny_float, tmp_path):
    from mlx_lm import load

    _, model_dir, _ = build_model(
        tmp_path,
        tiny_original,
        tiny_float,
        ["tiers.experts=mxfp4", "tiers.sensitive=bf16", "tiers.attention=bf16"],
    )
    outputs = []
    for path in (tiny_original, model_dir):
        model, tokenizer = load(str(path))
        ids = tokenizer.encode("The sea was calm and the ship")
        outputs.append(np.array(model(mx.array([ids]))[0].astype(mx.float32)))
        gate = model.model.layers[3].mlp.experts.gate_proj
        assert gate.mode == "mxfp4"
        outputs.append(np.array(gate.weight))
        del model
    np.testing.assert_array_equal(outputs[0], outputs[2])  # identical logits
    np.testing.assert_array_equal(outputs[1], outputs[3])  # identical packed bytes


def test_bf16_tier_is_the_float_checkpoint_bit_for_bit(tiny_original, tiny_float, tmp_path):
    """quantize reads the original, never data/float: a bf16 tier of every kind of tensor
    (expert matrices decoded from MXFP4, expert biases split out of gate_up_proj_bias,
    the rest copied) must hold exactly convert's bytes."""
    with Checkpoint(tiny_float) as flt:
        names = [n for n in flt.tensors if n.startswith("model.layers.1.")]
        names += ["model.embed_tokens.weight", "model.norm.weight"]
        manifest = quantize_tier(
            tier="t",
            tensor_names=names,
            precision=parse_precision("bf16", "tiers.t"),
            original_dir=tiny_original,
            out_dir=tmp_path / "t",
            max_shard_bytes=10**9,
        )
        assert sorted(manifest["tensors"]) == sorted(names)
        with Checkpoint(tmp_path / "t") as out:
            for name in names:
                np.testing.assert_array_equal(out.read(name), flt.read(name), err_msg=name)


def test_group_size_that_does_not_divide_the_input_width():
    weight = Weight(
        "model.layers.0.self_attn.q_proj.weight", "q_proj", 0, "sliding_attention", (256, 96)
    )
    with pytest.raises(TierquantError, match=r"tiers.attention.*q_proj.*96.*group size 64"):
        precision = parse_precision(4, "tiers.attention", 64)
        check_quantizable(
            "attention", precision, name=weight.name, kind=weight.kind, shape=weight.shape
        )


def test_mxfp4_for_a_non_expert_module_is_refused():
    weight = Weight("lm_head.weight", "lm_head", None, None, (1024, 128))
    with pytest.raises(TierquantError, match="lm_head"):
        precision = parse_precision("mxfp4", "tiers.sensitive")
        check_quantizable(
            "sensitive", precision, name=weight.name, kind=weight.kind, shape=weight.shape
        )


def test_failed_quantize_leaves_nothing(tiny_float, tiny_original, tmp_path):
    out = tmp_path / "experts"
    with pytest.raises(TierquantError, match="not a tensor"):
        quantize_tier(
            tier="experts",
            tensor_names=["model.layers.0.mlp.nope.weight"],
            precision=parse_precision(3, "tiers.experts"),
            original_dir=tiny_original,
            out_dir=out,
            max_shard_bytes=10**6,
        )
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_stale_tier_output_is_refused(seed_model, tmp_path):
    from tierquant.build.assemble import assemble_model
    from tierquant.core.precision import parse_tiers

    config, model_dir, _ = seed_model
    root = model_dir.parent
    tiers = parse_tiers({**config.tiers, "experts": 4}, 64)
    with pytest.raises(TierquantError, match=r"experts.*rerun quantize@experts"):
        assemble_model(
            tiers=tiers,
            quantized_dir=root / "quantized",
            original_dir=root.parent,
            out_dir=tmp_path / "model",
            size_metrics=tmp_path / "s.json",
            error_plot=tmp_path / "e.csv",
        )
    assert not (tmp_path / "model").exists()


def test_mixed_3_6_matches_mlx_lm_convert(tiny_original, tiny_float, tmp_path):
    """Our mixed_3_6 recipe gives mlx-lm's own `--quant-predicate mixed_3_6` tensors."""
    from mlx_lm.utils import load_config

    _, ours, _ = build_model(tmp_path / "ours", tiny_original, tiny_float, ["recipe=mixed_3_6"])
    theirs = tmp_path / "theirs"
    subprocess.run(
        [
            str(Path(sys.executable).parent / "mlx_lm.convert"),
            "--hf-path",
            str(tiny_float),
            "--mlx-path",
            str(theirs),
            "-q",
            "--quant-predicate",
            "mixed_3_6",
        ],
        check=True,
        capture_output=True,
    )
    ours_q, theirs_q = load_config(ours)["quantization"], load_config(theirs)["quantization"]
    with Checkpoint(ours) as a, Checkpoint(theirs) as b:
        assert set(a.tensors) == set(b.tensors)
        for name in a.tensors:
            assert a.info(name).spec == b.info(name).spec, name
            np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)
    for module, entry in theirs_q.items():
        if isinstance(entry, dict):
            assert ours_q[module]["bits"] == entry["bits"], module


@pytest.mark.parametrize("error_deferred", [True, False], ids=["cpu-order", "gpu-order"])
@pytest.mark.parametrize("streams", [2, 3])
def test_sliced_quantize_on_several_streams_equals_whole_tensor(
    tiny_float, tiny_original, tmp_path, monkeypatch, streams, error_deferred
):
    """Small slices spread over several streams and evaluated asynchronously give the
    bytes of one `mx.quantize` of the whole tensor, in order (the oracle: mlx-lm's call),
    and the error of its sampled rows (the oracle: numpy in float64), whether the error
    sample is queued with each slice (the GPU's order) or once it is quantized (the CPU's)."""
    import tierquant.build.quantize as q
    import tierquant.core.affine

    monkeypatch.setattr(
        tierquant.core.affine, "SLICE_BYTES", 3000
    )  # many slices of a few rows each
    monkeypatch.setattr(
        q,
        "slice_streams",
        lambda: tuple(mx.new_stream(mx.default_device()) for _ in range(streams)),
    )
    monkeypatch.setattr(q, "ops_queue_capped", lambda: error_deferred)
    with Checkpoint(tiny_float) as src:
        names = [
            n
            for n in src.tensors
            if n.endswith(("mlp.experts.down_proj.weight", "self_attn.q_proj.weight"))
        ][:2]
        assert any("experts" in n for n in names) and src.info(names[0]).shape[0] > 1
        manifest = quantize_tier(
            tier="t",
            tensor_names=names,
            precision=parse_precision(4, "tiers.t"),
            original_dir=tiny_original,
            out_dir=tmp_path / "t",
            max_shard_bytes=10**9,
        )
        with Checkpoint(tmp_path / "t") as out:
            for name in names:
                module = name.removesuffix(".weight")
                whole = mx.array(src.read(name)).view(mx.bfloat16)
                expected = mx.quantize(whole, group_size=64, bits=4)
                for suffix, arr in zip(("weight", "scales", "biases"), expected, strict=True):
                    got = out.read(f"{module}.{suffix}")
                    want = np.array(arr.view(mx.uint16) if suffix != "weight" else arr)
                    np.testing.assert_array_equal(got, want, err_msg=f"{module}.{suffix}")
                # every ERROR_ROW_STRIDE-th row of each slice (of each expert)
                sample = (..., slice(None, None, q.ERROR_ROW_STRIDE), slice(None))
                dq = mx.dequantize(*expected, group_size=64, bits=4).astype(mx.float32)
                err_sq = ref_sq = 0.0
                for start, stop in tierquant.core.affine.slices(whole.shape):
                    ref = np.array(whole[start:stop][sample].astype(mx.float32), np.float64)
                    got = np.array(dq[start:stop][sample], np.float64)
                    err_sq += np.sum((got - ref) ** 2)
                    ref_sq += np.sum(ref**2)
                rel_rmse = np.sqrt(err_sq / ref_sq)
                assert 0 < rel_rmse < 0.2
                assert manifest["modules"][module]["rel_rmse"] == pytest.approx(rel_rmse, rel=1e-5)


def test_a_config_that_disagrees_with_the_tensors_is_named(tiny_original, tmp_path):
    """A wrong num_local_experts in config.json: quantize names config.json (as convert
    and plan do, through gptoss.verify_original), not a short read of a tensor."""
    import shutil

    original = tmp_path / "original"
    shutil.copytree(tiny_original, original)
    config = json.loads((original / "config.json").read_text())
    config["num_local_experts"] = 16
    (original / "config.json").write_text(json.dumps(config))
    out = tmp_path / "experts"
    with pytest.raises(TierquantError, match="config.json implies") as e:
        quantize_tier(
            tier="experts",
            tensor_names=["model.layers.0.mlp.experts.gate_proj.weight"],
            precision=parse_precision(3, "tiers.experts"),
            original_dir=original,
            out_dir=out,
            max_shard_bytes=10**6,
        )
    assert "short read" not in str(e.value)
    assert not out.exists()
