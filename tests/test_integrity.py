"""validate's integrity check: every tensor of the model against its source.

A swapped pair of same-shaped tensors, a zeroed expert and a module quantized at other
bits than its tier (stored in the tier's format, so the structure check cannot see it)
each fail with one `validate: integrity:` line naming the tensor; an intact model passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tierquant.check.integrity import check_integrity
from tierquant.check.validate import GATES, validate_model
from tierquant.errors import TierquantError
from tierquant.quality import evalset, evaluate


@pytest.fixture(scope="module")
def seed(models):
    """The seed recipe's model (shared, read-only) and its build root (plan/, quantized/)."""
    config, model_dir, plan_dir = models()
    return config, plan_dir.parent


def _check(config, root: Path, model_dir: Path, tiny_original) -> list[str]:
    return check_integrity(
        model_dir=model_dir,
        original_dir=tiny_original,
        quantized_dir=root / "quantized",
        tiers=config.precisions(),
    )


def _edit(src: Path, dst: Path, change) -> Path:
    """Copy model dir `src` to `dst` (fresh files), apply change(tensors) to every shard."""
    import mlx.core as mx

    shutil.copytree(src, dst)
    for shard in sorted(dst.glob("model-*.safetensors")):
        tensors, meta = mx.load(str(shard), return_metadata=True)
        if change(tensors):
            shard.unlink()
            mx.save_safetensors(str(shard), tensors, metadata=meta)
    return dst


def _all_tensors(model_dir: Path) -> dict:
    """Every tensor of a checkpoint dir (lazy)."""
    import mlx.core as mx

    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out.update(mx.load(str(shard)))
    return out


def test_intact_model_passes(seed, tiny_original):
    config, root = seed
    assert _check(config, root, root / "model", tiny_original) == []


def test_swapped_q_proj_names_both(seed, tiny_original, tmp_path):
    config, root = seed
    # Layers 2 and 4: middle sliding-window layers, both in the 4-bit `attention` tier.
    a, b = "model.layers.2.self_attn.q_proj", "model.layers.4.self_attn.q_proj"
    every = _all_tensors(root / "model")

    def swap(tensors):
        hit = False
        for part in ("weight", "scales", "biases"):
            for x, y in ((a, b), (b, a)):
                if f"{x}.{part}" in tensors:
                    tensors[f"{x}.{part}"] = every[f"{y}.{part}"]
                    hit = True
        return hit

    broken = _edit(root / "model", tmp_path / "model", swap)
    problems = _check(config, root, broken, tiny_original)
    assert len(problems) == 2
    assert problems[0].startswith(f"{a}.weight: relative error")
    assert problems[1].startswith(f"{b}.weight: relative error")


def test_zeroed_expert_is_named(seed, tiny_original, tmp_path):
    import mlx.core as mx

    config, root = seed
    module = "model.layers.1.mlp.experts.down_proj"

    def zero(tensors):
        if f"{module}.scales" not in tensors:
            return False
        for part in ("scales", "biases"):
            t = tensors[f"{module}.{part}"]
            keep = (mx.arange(t.shape[0]) != 3)[:, None, None]
            tensors[f"{module}.{part}"] = mx.where(keep, t, mx.zeros_like(t))
        return True

    broken = _edit(root / "model", tmp_path / "model", zero)
    problems = _check(config, root, broken, tiny_original)
    assert len(problems) == 1 and problems[0].startswith(f"{module}.weight (expert 3):")


def test_other_bits_in_the_tier_format_and_one_error_line(
    seed, tiny_float, tiny_original, tmp_path
):
    import mlx.core as mx

    config, root = seed
    module = "model.layers.0.self_attn.v_proj"  # the 6-bit `sensitive` tier
    source = _all_tensors(tiny_float)[f"{module}.weight"]

    def requantize(tensors):
        if f"{module}.weight" not in tensors:
            return False
        three = mx.dequantize(*mx.quantize(source, group_size=64, bits=3), group_size=64, bits=3)
        w, s, b = mx.quantize(three.astype(mx.bfloat16), group_size=64, bits=6)
        tensors.update({f"{module}.weight": w, f"{module}.scales": s, f"{module}.biases": b})
        return True

    broken = _edit(root / "model", tmp_path / "model", requantize)
    problems = _check(config, root, broken, tiny_original)
    assert len(problems) == 1 and problems[0].startswith(f"{module}.weight: relative error")
    # Through validate: one `validate: integrity:` line naming it, metrics still written.
    out = tmp_path / "validate.json"
    kwargs = dict(
        model_dir=broken,
        reference_dir=tmp_path / "no-reference",
        plan_dir=root / "plan",
        original_dir=tiny_original,
        quantized_dir=root / "quantized",
        tiers=config.precisions(),
        thresholds=config.validate,
        metrics_path=out,
    )
    with pytest.raises(TierquantError) as failed:
        validate_model(**kwargs)
    lines = str(failed.value).splitlines()
    integrity = [x for x in lines if x.startswith("validate: integrity:")]
    assert len(integrity) == 1 and f"{module}.weight" in integrity[0]
    assert any("no-reference/meta.json: missing" in x for x in lines)  # no traceback
    assert not out.exists()  # nothing half-measured is written
    # With a reference, the metrics say why: integrity, and every gate verdict.
    ref = tmp_path / "reference"
    tokens = evalset.make_windows(np.arange(2000) % 1000, 2, 32)
    evaluate.save_reference(
        evaluate.streamed_reference(tiny_original, tokens, top_k=64, batch_size=2), ref
    )
    with pytest.raises(TierquantError, match="validate: integrity: 1 tensor"):
        validate_model(**{**kwargs, "reference_dir": ref})
    metrics = json.loads(out.read_text())
    assert metrics["passed"] is False and metrics["integrity_problems"] == 1
    assert [g["param"] for g in metrics["gate"]] == [f"validate.{k}" for k in GATES]


def test_missing_reference_and_structure_problems_fail_together_without_traceback(
    seed, tiny_original, tmp_path
):
    from tierquant.config import compose, validate

    config, root = seed
    wrong = validate(compose(["tiers.experts=4"]))  # the model holds 3-bit experts
    with pytest.raises(TierquantError) as failed:  # not any other exception type
        validate_model(
            model_dir=root / "model",
            reference_dir=tmp_path / "no-reference",
            plan_dir=root / "plan",
            original_dir=tiny_original,
            quantized_dir=root / "quantized",
            tiers=wrong.precisions(),
            thresholds=wrong.validate,
            metrics_path=tmp_path / "validate.json",
        )
    text = str(failed.value)
    assert "validate: structure:" in text and "no-reference/meta.json: missing" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("start,step", [(0, 16), (3, 5)])
def test_float_rows_from_the_original_are_the_float_checkpoints(
    tiny_float, tiny_original, start, step
):
    """What integrity compares the model with (every tensor kind: expert rows decoded from
    the MXFP4 rows that hold them, expert biases split out of gate_up_proj_bias, the rest
    read by name) equals the same rows of the float checkpoint convert wrote."""
    from tierquant.core.checkpoint import Checkpoint
    from tierquant.core.floatrows import float_row_sample
    from tierquant.core.gptoss import mlx_weights, shape_of_checkpoint

    weights = mlx_weights(shape_of_checkpoint(tiny_original))
    with Checkpoint(tiny_original) as original, Checkpoint(tiny_float) as floats:
        assert sorted(w.name for w in weights) == sorted(floats.tensors)
        for w in weights:
            ours = float_row_sample(original, w, start, step)
            theirs = floats.read_row_sample(w.name, start, step)
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, w.name
            assert np.array_equal(ours, theirs), w.name
