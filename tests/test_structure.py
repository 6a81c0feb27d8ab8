"""The structural check of data/model: what stock mlx-lm's loader accepts, and NaN in any
stored form (bf16 values, E8M0 scale bytes); models whose largest tier is bf16."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from tierquant.check.structure import check_structure
from tierquant.core.checkpoint import Checkpoint

ALL_BF16 = (
    "tiers.control=bf16",
    "tiers.sensitive=bf16",
    "tiers.attention=bf16",
    "tiers.experts=bf16",
)
EXPERTS_BF16 = ("tiers.experts=bf16",)
MXFP4_ONLY = ("tiers.experts=mxfp4", "tiers.sensitive=bf16", "tiers.attention=bf16")


@pytest.mark.parametrize("overrides", [ALL_BF16, EXPERTS_BF16, MXFP4_ONLY])
def test_a_model_whose_largest_tier_is_bf16_loads_with_stock_mlx_lm(models, overrides):
    from mlx_lm import load

    config, model_dir, plan_dir = models(*overrides)
    size = json.loads((model_dir.parent / "size.json").read_text())
    model_config = json.loads((model_dir / "config.json").read_text())
    precisions = config.precisions()
    quantized = [t for t, p in precisions.items() if p.quantized]
    if not quantized:  # nothing quantized: a plain bf16 model, as mlx-lm writes one
        assert "quantization" not in model_config
        assert "quantization_config" not in model_config
    else:  # the defaults are the largest quantized tier's
        largest = max(quantized, key=lambda t: size["tiers"][t]["params"])
        default = {k: model_config["quantization"][k] for k in ("group_size", "bits", "mode")}
        assert default == precisions[largest].quantization()
    assert check_structure(model_dir, plan_dir, precisions).problems == []
    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)  # MLX's CPU gather_mm (bf16 experts) is float32 only
    logits = model(mx.array([tokenizer.encode("The sea was calm")]))
    assert bool(mx.all(mx.isfinite(logits)).item())


def test_structure_flags_a_config_stock_mlx_lm_cannot_load(models, tmp_path):
    config, model_dir, plan_dir = models()
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    model_config = json.loads((broken / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        del model_config[key]["group_size"]  # what assemble wrote for a bf16 largest tier
    (broken / "config.json").write_text(json.dumps(model_config))
    problems = check_structure(broken, plan_dir, config.precisions()).problems
    assert len(problems) == 1, problems
    assert "mlx-lm" in problems[0] and "group_size" in problems[0]


def test_structure_flags_a_nan_scale_byte_in_an_mxfp4_expert(models, tmp_path):
    config, model_dir, plan_dir = models(*MXFP4_ONLY)
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)  # copies: the tier shards are hard links
    name = "model.layers.1.mlp.experts.down_proj.scales"
    with Checkpoint(broken) as ckpt:
        info = ckpt.info(name)
        assert info.dtype == "U8"
        assert int(ckpt.read(name).max()) < 255
    with open(info.path, "r+b") as f:
        f.seek(info.offset + 7)
        f.write(bytes([255]))  # E8M0 NaN
    report = check_structure(broken, plan_dir, config.precisions())
    assert report.nonfinite_tensors == 1
    assert report.problems == [f"{name}: 1 NaN scale byte(s) (E8M0 255)"]
    with Checkpoint(broken) as ckpt:  # only that byte changed
        assert np.count_nonzero(ckpt.read(name) == 255) == 1
