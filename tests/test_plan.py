"""Recipes, the plan stage and the size prediction: every tensor in exactly one tier,
clear errors naming the tensor or key, and the seed's figures on the real 120b shapes."""

from __future__ import annotations

import copy
import json
from fractions import Fraction
from pathlib import Path

import pytest

from tests.conftest import REPO, run_stage, tiny_spec
from tests.headers import real_spec, write_header_only_checkpoint
from tierquant.config import Config, SyntheticSpec, compose, validate
from tierquant.core.gptoss import KINDS, GptOssShape, mlx_weights
from tierquant.core.precision import parse_precision
from tierquant.errors import TierquantError
from tierquant.plan.handplan import plan, plan_tiers
from tierquant.plan.predict import predict
from tierquant.plan.recipe import edge_bounds, is_edge
from tierquant.source.synthetic import config_json, shape_of

GIB = 1 << 30


def config(*overrides: str, edit=None) -> Config:
    """The composed, validated config; `edit(params)` may change the raw dict first."""
    params = compose(list(overrides))
    if edit is not None:
        edit(params)
    return validate(params)


def shape_with_layers(n: int) -> GptOssShape:
    return shape_of(tiny_spec(num_hidden_layers=n))


def tier_of(tiers) -> dict[str, str]:
    return {w.name: tier for tier, ws in tiers.items() for w in ws}


# --- the seed recipe on the tiny model ---------------------------------------------------


def test_seed_recipe_assigns_every_tensor_once_and_fills_every_tier():
    cfg = config()
    shape = shape_of(tiny_spec())
    tiers = plan_tiers(shape, cfg.recipe)
    assert list(tiers) == ["control", "sensitive", "attention", "experts"]
    assert all(tiers.values()), "every tier is non-empty"
    names = [w.name for ws in tiers.values() for w in ws]
    assert sorted(names) == sorted(w.name for w in mlx_weights(shape))
    assert len(names) == len(set(names))
    by_tier = {t: {w.kind for w in ws} for t, ws in tiers.items()}
    assert by_tier["control"] == {"norm", "router", "bias", "sinks"}
    assert by_tier["experts"] == {"gate_proj", "up_proj", "down_proj"}
    assert by_tier["attention"] == {"q_proj", "k_proj"}
    assert set(KINDS) == set().union(*by_tier.values())


@pytest.mark.parametrize(
    "n, edge",
    [
        (6, {0, 5}),
        (24, {0, 1, 2, 3, 20, 21, 22, 23}),
        (36, {0, 1, 2, 3, 4, 5, 30, 31, 32, 33, 34, 35}),
    ],
)
def test_edge_layers_are_the_first_and_last_sixth(n, edge):
    f = Fraction(1, 6)
    assert {i for i in range(n) if is_edge(i, n, f)} == edge
    tiers = tier_of(plan_tiers(shape_with_layers(n), config().recipe))
    for i in range(n):
        q = tiers[f"model.layers.{i}.self_attn.q_proj.weight"]
        k = tiers[f"model.layers.{i}.self_attn.k_proj.weight"]
        full = i % 2 == 1
        assert q == k == ("sensitive" if i in edge or full else "attention"), i
        assert tiers[f"model.layers.{i}.self_attn.v_proj.weight"] == "sensitive"
        assert tiers[f"model.layers.{i}.self_attn.o_proj.weight"] == "sensitive"
        assert tiers[f"model.layers.{i}.mlp.router.weight"] == "control"


def test_edge_bounds_use_exact_fractions():
    assert edge_bounds(36, Fraction(1, 6)) == (6, 30)
    assert edge_bounds(36, Fraction(1, 8)) == (4, 31)  # mlx-lm: n//8, 7n//8
    assert edge_bounds(24, Fraction(1, 8)) == (3, 21)
    assert edge_bounds(6, Fraction(1, 8)) == (0, 5)
    assert edge_bounds(30, Fraction(1, 10)) == (3, 27)  # 0.1 as a float would give 2.99..


# --- errors ------------------------------------------------------------------------------


def _drop_bias_from_control(p):
    p["recipe"]["tiers"]["control"][0]["kinds"].remove("bias")


def _q_proj_also_in_experts(p):
    p["recipe"]["tiers"]["experts"].append({"kinds": ["q_proj"], "layers": [[2, 3]]})


def _rule_matching_nothing(p):
    p["recipe"]["tiers"]["attention"].append({"kinds": ["q_proj"], "layers": [[100, 200]]})


@pytest.mark.parametrize(
    "edit, named",
    [
        (_drop_bias_from_control, ["model.layers.0.self_attn.q_proj.bias", "no tier"]),
        (
            _q_proj_also_in_experts,
            [
                "model.layers.2.self_attn.q_proj.weight",
                "recipe.tiers.attention[0]",
                "recipe.tiers.experts[1] {kinds: [q_proj], layers: [[2, 3]]}",
            ],
        ),
        (_rule_matching_nothing, ["recipe.tiers.attention[1]", "matches no tensor"]),
    ],
)
def test_bad_assignment_names_tensor_and_rule(edit, named):
    cfg = config(edit=edit)
    with pytest.raises(TierquantError) as e:
        plan_tiers(shape_of(tiny_spec()), cfg.recipe)
    for text in named:
        assert text in str(e.value)


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("kinds", ["qproj"], "recipe.tiers.attention[0].kinds: unknown value 'qproj'"),
        ("position", "centre", "recipe.tiers.attention[0].position: unknown value 'centre'"),
        ("layer_types", ["local"], "recipe.tiers.attention[0].layer_types: unknown value"),
        ("layers", [[3, 1]], "recipe.tiers.attention[0].layers[0]"),
        ("stride", {"step": 3, "offsets": [3]}, "recipe.tiers.attention[0].stride"),
        ("kind", ["q_proj"], "recipe.tiers.attention[0].kind"),
    ],
)
def test_bad_rule_is_named_at_load(field, value, named):
    def edit(p):
        p["recipe"]["tiers"]["attention"][0][field] = value

    with pytest.raises(TierquantError, match="^params: ") as e:
        config(edit=edit)
    assert named in str(e.value)


def test_empty_rule_and_bad_edge_fraction_are_errors():
    with pytest.raises(TierquantError, match=r"recipe.tiers.attention\[1\] has no selector"):
        config(edit=lambda p: p["recipe"]["tiers"]["attention"].append({}))
    with pytest.raises(TierquantError, match="recipe.edge_layers"):
        config("recipe.edge_layers=one-sixth")
    with pytest.raises(TierquantError, match="recipe.edge_layers"):
        config("recipe.edge_layers=2/3")


@pytest.mark.parametrize("value", [7, 9, 0, "fp3", True, 4.5])
def test_bad_bits_name_the_key(value):
    def edit(p):
        p["tiers"]["experts"] = value

    with pytest.raises(TierquantError, match="tiers.experts"):
        config(edit=edit)


@pytest.mark.parametrize("group_size", [16, 100, 256])
def test_bad_group_size_names_the_key(group_size):
    with pytest.raises(TierquantError, match="quant.group_size"):
        config(f"quant.group_size={group_size}")


def test_precisions():
    assert parse_precision(3, "k").bits_per_weight == Fraction(7, 2)
    assert parse_precision("6", "k", 32).bits_per_weight == 7
    assert parse_precision(4, "k", 128).bits_per_weight == Fraction(17, 4)
    assert parse_precision(16, "k") == parse_precision("bf16", "k")
    assert parse_precision("bf16", "k").bits_per_weight == 16
    mxfp4 = parse_precision("mxfp4", "k")
    assert mxfp4.bits_per_weight == Fraction(17, 4)
    assert mxfp4.quantization() == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert parse_precision(8, "k").quantization() == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert parse_precision("BF16", "k").quantization() is None
    assert mxfp4.weight_bits("bias") == 16  # vectors stay bf16 whatever the tier says


# --- plan files --------------------------------------------------------------------------


def test_plan_files_do_not_depend_on_bits(tiny_original, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    plan(original=tiny_original, recipe=config().recipe, out=a)
    other = config(
        "tiers.experts=4", "tiers.sensitive=8", "tiers.control=16", "quant.group_size=32"
    )
    plan(original=tiny_original, recipe=other.recipe, out=b)
    files = sorted(p.name for p in a.iterdir())
    assert files == ["attention.json", "control.json", "experts.json", "sensitive.json"]
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    experts = json.loads((a / "experts.json").read_text())
    assert experts["tier"] == "experts" and "bits" not in json.dumps(experts)
    names = [t["name"] for t in experts["tensors"]]
    assert names == sorted(names)
    assert experts["modules"][0] == "model.layers.0.mlp.experts.down_proj"
    assert experts["numel"] == sum(t["numel"] for t in experts["tensors"])


def test_plan_error_leaves_previous_output(tiny_original, tmp_path):
    out = tmp_path / "plan"
    plan(original=tiny_original, recipe=config().recipe, out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(TierquantError):
        plan(original=tiny_original, recipe=config(edit=_drop_bias_from_control).recipe, out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]


def test_predict_checks_tiers_against_plan(tiny_original, tmp_path):
    cfg = config()
    plan(original=tiny_original, recipe=cfg.recipe, out=tmp_path / "plan")
    kw = dict(plan_dir=tmp_path / "plan", original=tiny_original, group_size=64)
    with pytest.raises(TierquantError, match="tiers.router has no plan"):
        predict(**kw, tiers={**cfg.tiers, "router": 8}, out=tmp_path / "s.json")
    with pytest.raises(TierquantError, match="recipe tier 'attention' has no precision"):
        tiers = {k: v for k, v in cfg.tiers.items() if k != "attention"}
        predict(**kw, tiers=tiers, out=tmp_path / "s.json")
    with pytest.raises(TierquantError, match="tiers.sensitive: mxfp4 keeps the original expert"):
        predict(**kw, tiers={**cfg.tiers, "sensitive": "mxfp4"}, out=tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()
    report = predict(**kw, tiers={**cfg.tiers, "experts": "mxfp4"}, out=tmp_path / "s.json")
    assert report["tiers"]["experts"]["bits_per_weight"] == 4.25
    assert json.loads((tmp_path / "s.json").read_text()) == report


# --- the real shapes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    return {
        m: write_header_only_checkpoint(root / m, real_spec(m))
        for m in ("gpt-oss-120b", "gpt-oss-20b")
    }


def predicted(original: Path, tmp: Path, cfg: Config) -> dict:
    plan(original=original, recipe=cfg.recipe, out=tmp / "plan")
    return predict(
        plan_dir=tmp / "plan",
        original=original,
        tiers=cfg.tiers,
        group_size=cfg.quant.group_size,
        out=tmp / "size.json",
    )


def test_seed_recipe_on_gpt_oss_120b_is_3_557_bits_and_48_4_gib(real_checkpoints, tmp_path):
    report = predicted(real_checkpoints["gpt-oss-120b"], tmp_path, config())
    total = report["total"]
    assert round(total["bits_per_weight"], 3) == 3.557
    assert round(total["bytes"] / GIB, 1) == 48.4
    assert total["bytes"] == 51_949_344_384
    assert total["params"] == 116_829_156_672
    assert report["original"]["bytes"] == 65_248_815_744
    assert report["tiers"]["experts"]["bits_per_weight"] == 3.5
    assert report["tiers"]["sensitive"]["bits_per_weight"] == 6.5


def test_seed_recipe_on_gpt_oss_20b(real_checkpoints, tmp_path):
    report = predicted(real_checkpoints["gpt-oss-20b"], tmp_path, config())
    print(
        f"gpt-oss-20b, seed recipe: {report['total']['bits_per_weight']:.3f} bits per weight, "
        f"{report['total']['bytes']:,} bytes ({report['total']['gib']} GiB); original "
        f"{report['original']['bytes']:,} bytes"
    )
    assert report["original"]["bytes"] == 13_761_264_768
    assert report["total"]["bytes"] == 9_811_241_088
    assert round(report["total"]["bits_per_weight"], 3) == 3.753


def test_group_size_must_divide_the_input_width(real_checkpoints, tmp_path):
    # 2880 is not a multiple of 128: mlx-lm would silently skip those matrices
    with pytest.raises(TierquantError, match="quant.group_size"):
        predicted(real_checkpoints["gpt-oss-20b"], tmp_path, config("quant.group_size=128"))


def test_predict_stage_refuses_a_group_size_before_convert(tmp_path):
    """hidden 96 with group 64: `dvc repro predict` (headers only) says so, not quantize."""
    original = write_header_only_checkpoint(tmp_path / "original", tiny_spec(hidden_size=96))
    plan(original=original, recipe=config().recipe, out=tmp_path / "plan")
    out = tmp_path / "predicted_size.json"
    proc = run_stage(
        "predict",
        f"paths.original={original}",
        f"paths.plan={tmp_path / 'plan'}",
        f"paths.predict={out}",
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: params: tiers.")
    assert "quant.group_size" in error and ", 96]" in error  # the key, the width
    assert "tensor 'lm_head.weight'" in error  # the tensor
    assert "Use a group size that divides it" in error  # what to do
    assert not out.exists()


# --- mixed_3_6 is mlx-lm's predicate -----------------------------------------------------


def mlx_lm_mixed_3_6(n: int) -> dict[str, int | None]:
    """module -> bits that mlx-lm 0.32.2's `mixed_3_6` gives a bf16 gpt-oss of n layers."""
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.models.gpt_oss import Model, ModelArgs

    spec = SyntheticSpec(
        num_hidden_layers=n, hidden_size=64, intermediate_size=64, num_local_experts=2
    )
    model = Model(ModelArgs.from_dict(config_json(spec)))
    predicate = mixed_quant_predicate_builder("mixed_3_6", model, 64)
    bits: dict[str, int | None] = {}
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized") and module.weight.shape[-1] % 64 == 0:
            bits[path] = predicate(path, module)["bits"]
    return bits


@pytest.mark.parametrize("n", [2, 3, 4, 6, 24, 36])  # mlx-lm builds no 1-layer gpt-oss
def test_mixed_3_6_recipe_reproduces_mlx_lm(n):
    """At every depth, including those too shallow for its every-third-layer rule."""
    cfg = config("recipe=mixed_3_6")
    assert cfg.tiers == {"control": "bf16", "router": 3, "high": 6, "low": 3}
    shape = shape_of(
        SyntheticSpec(
            num_hidden_layers=n, hidden_size=64, intermediate_size=64, num_local_experts=2
        )
    )
    precisions = cfg.precisions()
    ours = {}
    for tier, weights in plan_tiers(shape, cfg.recipe).items():
        for w in weights:
            if w.is_matrix:
                ours[w.module] = precisions[tier].bits
            else:
                assert tier == "control", w.name
    assert ours == mlx_lm_mixed_3_6(n)


def test_recipes_compose_with_matching_tiers():
    for recipe in ("seed", "mixed_3_6"):
        cfg = config(f"recipe={recipe}")
        assert cfg.recipe.name == recipe
        assert list(cfg.precisions()) == list(cfg.recipe.tiers)


# --- the stage scripts -------------------------------------------------------------------


def test_stages_run_and_bad_overrides_exit_cleanly(tiny_original, tmp_path):
    paths = [f"paths.original={tiny_original}", f"paths.plan={tmp_path / 'plan'}"]
    predict_path = f"paths.predict={tmp_path / 'predicted_size.json'}"
    proc = run_stage("plan", *paths)
    assert proc.returncode == 0, proc.stderr
    proc = run_stage("predict", *paths, predict_path)
    assert proc.returncode == 0, proc.stderr
    assert "total" in proc.stdout and "experts" in proc.stdout
    report = json.loads((tmp_path / "predicted_size.json").read_text())
    assert set(report["tiers"]) == {"control", "sensitive", "attention", "experts"}

    for stage, override, named in [
        ("predict", "tiers.experts=7", "tiers.experts"),
        ("plan", "recipe.tiers.attention.0.position=centre", "recipe.tiers.attention[0].position"),
        ("plan", "recipe.edge_layers=1/2", "recipe.tiers.attention[0]"),  # matches nothing
    ]:
        out = tmp_path / f"bad-{stage}"
        extra = [f"paths.plan={out}"] if stage == "plan" else [f"paths.predict={out}"]
        proc = run_stage(stage, *paths, *extra, override)
        assert proc.returncode == 1, (override, proc.stdout, proc.stderr)
        assert named in proc.stderr, (override, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not out.exists()
    assert not (REPO / "outputs").exists()


def test_config_copies_are_independent():
    # typed_rules must not mutate the raw params it was given
    params = compose()
    raw = copy.deepcopy(params)
    validate(params)
    assert params == raw
