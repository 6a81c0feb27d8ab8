"""measure with GPTQ-rounded candidates (measure.rounding=gptq): a
decoder group's candidate module holds exactly the bytes quantize_gptq@<tier> writes for
it, and its damage (lm_head's too) is the end-to-end KL of stock mlx-lm's model with
just that group replaced by those bytes (read back from the tier's safetensors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_measure import _kl_mean

BITS = 3
# every affine tier at BITS, so each module's tier file holds the bytes of candidate BITS
UNIFORM = [f"tiers.{t}={BITS}" for t in ("sensitive", "attention", "experts")]
SMALL = ["calibration.num_windows=2", "calibration.window_length=32"]


@pytest.fixture(scope="module")
def gptq_tiers(tiny_original, tmp_path_factory):
    """(config, tokens, {module: (packed, scales, biases)} as measure scored them, damage)
    of the tiny (random) model: quantize_gptq@<tier> run at BITS everywhere, then
    measure_damage(rounding=config.measure.rounding, gptq) on the same calibration windows."""
    import tierquant.quality.measure as measure_mod
    from tierquant.config import compose, validate
    from tierquant.core.precision import parse_candidates
    from tierquant.pipeline import paths_under, run_stages
    from tierquant.quality.windows import read_windows

    root = tmp_path_factory.mktemp("measure_gptq")
    overrides = ["quant.rounding=gptq", "measure.rounding=gptq", *UNIFORM, *SMALL]
    config = paths_under(validate(compose(overrides)), root, original=tiny_original)
    run_stages(config, ["calibration", "plan", "quantize"])
    tokens = read_windows(Path(config.paths.calibration))
    scored: dict[str, tuple] = {}
    build = measure_mod.quantized_module

    def spy(weight, precision, qweights, bias):
        if precision.bits == BITS:
            scored[weight.module] = qweights
        return build(weight, precision, qweights, bias)

    mp = pytest.MonkeyPatch()
    mp.setattr(measure_mod, "quantized_module", spy)
    try:
        damage = measure_mod.measure_damage(
            original_dir=tiny_original,
            tokens=tokens,
            candidates=parse_candidates([BITS, "mxfp4"], config.quant.group_size),
            batch_size=config.calibration.batch_size,
            rounding=config.measure.rounding,
        )
    finally:
        mp.undo()
    return config, tokens, scored, damage


def _tier_arrays(config) -> dict[str, object]:
    """Every tensor quantize_gptq wrote, over all tiers, as mx arrays (bf16 kept)."""
    import mlx.core as mx

    out: dict[str, object] = {}
    for shard in sorted(Path(config.paths.quantized).glob("*/*.safetensors")):
        out.update(mx.load(str(shard)))
    return out


def test_scored_modules_hold_quantize_gptq_bytes(gptq_tiers):
    import mlx.core as mx

    config, _, scored, _ = gptq_tiers
    written = _tier_arrays(config)
    # every decoder matrix GPTQ rounds: 4 attention + 3 expert stacks per layer
    assert len(scored) == 7 * 6
    for module, qweights in scored.items():
        for part, got in zip(("weight", "scales", "biases"), qweights, strict=True):
            want = written[f"{module}.{part}"]
            assert got.dtype == want.dtype and got.shape == want.shape, (module, part)
            assert mx.array_equal(got, want).item(), (module, part)


def _end_to_end_with(float_dir, original_dir, tokens, modules, written, bits, group) -> float:
    """Mean KL vs the original of stock mlx-lm's float model with `modules` replaced by
    quantized modules holding `written`'s (the tier files') bytes."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from oracle import load_whole, whole_logits

    ref = whole_logits(load_whole(original_dir), tokens, 2)
    model, _ = load(str(float_dir))
    nn.quantize(model, group_size=group, bits=bits, class_predicate=lambda p, _m: p in modules)
    parts = ("weight", "scales", "biases")
    model.load_weights(
        [(f"{m}.{p}", written[f"{m}.{p}"]) for m in modules for p in parts], strict=False
    )
    model.set_dtype(mx.float32)
    return _kl_mean(ref, whole_logits(model, tokens, 2))


@pytest.mark.parametrize(
    "group",
    [
        "lm_head",
        "layers.0.attn_qk",
        "layers.1.experts_gate_up",
        "layers.3.attn_vo",
        "layers.5.experts_down",
    ],
)
def test_gptq_damage_is_the_end_to_end_kl_of_quantize_gptq_bytes(
    gptq_tiers, tiny_original, tiny_float, group
):
    from tierquant.core.gptoss import shape_of_checkpoint
    from tierquant.quality.damage import allocation_groups

    config, tokens, _, damage = gptq_tiers
    groups = {g.name: g for g in allocation_groups(shape_of_checkpoint(tiny_float))[0]}
    modules = {w.module for w in groups[group].weights}
    want = _end_to_end_with(
        tiny_float,
        tiny_original,
        tokens,
        modules,
        _tier_arrays(config),
        BITS,
        config.quant.group_size,
    )
    assert damage[group][f"{BITS}-bit g{config.quant.group_size}"] == pytest.approx(
        want, rel=2e-3, abs=1e-6
    )


def test_gptq_damage_mostly_below_rtn(gptq_tiers, tiny_original):
    """On the calibration windows GPTQ was fitted to, its candidates typically damage
    less than round-to-nearest (not required of every group)."""
    from tierquant.core.precision import parse_candidates
    from tierquant.quality.measure import measure_damage

    config, tokens, _, gptq = gptq_tiers
    rtn = measure_damage(
        original_dir=tiny_original,
        tokens=tokens,
        candidates=parse_candidates([BITS, "mxfp4"], config.quant.group_size),
        batch_size=config.calibration.batch_size,
        rounding="rtn",
    )
    label = f"{BITS}-bit g{config.quant.group_size}"
    decoder = [g for g in gptq if g.startswith("layers.")]
    below = [g for g in decoder if gptq[g][label] <= rtn[g][label]]
    print({g: (round(gptq[g][label], 5), round(rtn[g][label], 5)) for g in decoder})
    assert len(below) >= 0.75 * len(decoder)
    assert sum(gptq[g][label] for g in decoder) < sum(rtn[g][label] for g in decoder)
    assert gptq["embed_tokens"][label] == rtn["embed_tokens"][label]  # GPTQ is RTN there
    assert gptq["lm_head"][label] < rtn["lm_head"][label]


def test_gptq_head_in_vocab_slices_and_row_chunks_is_the_same(gptq_tiers, tiny_original):
    """lm_head scored over several vocab slices (the head's rows handed out in order) and
    GPTQ-rounded in several HEAD_ROWS chunks sharing one factor gives the same damage as
    the head in one piece (vocab 1024 here: one slice, one chunk by default)."""
    import tierquant.quality.hessian as hessian
    from tierquant.core.precision import parse_candidates
    from tierquant.quality.measure import measure_damage

    config, tokens, _, whole = gptq_tiers
    mp = pytest.MonkeyPatch()
    mp.setattr(hessian, "HEAD_ROWS", 96)  # 11 chunks, the last one short
    try:
        sliced = measure_damage(
            original_dir=tiny_original,
            tokens=tokens,
            candidates=parse_candidates([BITS], config.quant.group_size),
            batch_size=config.calibration.batch_size,
            rounding="gptq",
            vocab_chunk=320,  # 4 slices, the last one short
        )
    finally:
        mp.undo()
    label = f"{BITS}-bit g{config.quant.group_size}"
    assert sliced["lm_head"][label] == pytest.approx(whole["lm_head"][label], rel=1e-5)
