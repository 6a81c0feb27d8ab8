"""params.yaml is the composition of conf/, and bad config fails naming the key."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import REPO, run_stage
from tierquant.config import compose, validate
from tierquant.errors import TierquantError


def test_params_yaml_equals_composition_of_conf():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == compose(), "params.yaml drifted: run `python -m tierquant.config --write`"


@pytest.mark.parametrize("model", ["tiny", "wide", "gpt-oss-20b", "gpt-oss-120b"])
def test_every_model_config_validates(model):
    config = validate(compose([f"model={model}"]))
    assert config.model.name == model
    if config.model.source == "hub":
        assert config.model.repo_id == f"openai/{model}"
        assert "model-*.safetensors" in config.model.allow_patterns


def test_unknown_key_is_named():
    params = compose()
    params["model"]["synthetic"]["num_layers"] = 3
    with pytest.raises(TierquantError, match="num_layers"):
        validate(params)


def test_wrong_type_is_named():
    params = compose()
    params["model"]["synthetic"]["hidden_size"] = "wide"
    with pytest.raises(TierquantError, match="hidden_size"):
        validate(params)


def test_hub_model_needs_revision():
    params = compose(["model=gpt-oss-20b"])
    params["model"]["revision"] = None
    with pytest.raises(TierquantError, match="model.revision"):
        validate(params)


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.synthetic.hidden_size=abc", "hidden_size"),
        ("+model.synthetic.layers=3", "layers"),
        ("model.synthetc.seed=1", "synthetc"),
    ],
)
def test_stage_command_line_rejects_bad_overrides(tmp_path, override, named):
    out = tmp_path / "original"
    proc = run_stage("download", override, f"paths.original={out}")
    assert proc.returncode != 0
    assert named in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_stage_leaves_no_hydra_outputs(tmp_path):
    out = tmp_path / "original"
    before = {p.name for p in REPO.iterdir()}
    proc = run_stage("download", f"paths.original={out}")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in REPO.iterdir()} == before  # no outputs/, no *.log
    assert (out / "config.json").is_file()


def test_stage_help_says_what_the_stage_does():
    proc = run_stage("quantize", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: tierquant quantize tier=<tier>" in proc.stdout
    assert "or: python stages/quantize.py tier=<tier>" in proc.stdout
    assert "data/quantized/<tier>" in proc.stdout  # the stage script's own docstring


@pytest.mark.parametrize(
    "override, key",
    [
        ("validate.bpw_tolerance=-1", "validate.bpw_tolerance"),
        ("validate.top1_min=1.5", "validate.top1_min"),
        ("validate.kld_mean_max=-0.1", "validate.kld_mean_max"),
        ("validate.ppl_ratio_max=0", "validate.ppl_ratio_max"),
        ("memory.overhead_gib=-2", "memory.overhead_gib"),
        ("model.max_shard_bytes=0", "model.max_shard_bytes"),
        ("model.synthetic.hidden_size=0", "model.synthetic.hidden_size"),
    ],
)
def test_numeric_params_are_range_checked_naming_the_key(override, key):
    with pytest.raises(TierquantError, match=re.escape(key)):
        validate(compose([override]))


@pytest.mark.parametrize(
    "override, key",
    [
        ("budget.router=4", "budget.router"),
        ("measure.candidates=[3,3]", "measure.candidates[1]"),
        ("measure.candidates=[7]", "measure.candidates[0]"),
        ("measure.candidates=[]", "measure.candidates"),
        ("measure.carry_layers=-1", "measure.carry_layers"),
        ("eval.window_length=1", "eval.window_length"),
        ("calibration.num_windows=0", "calibration.num_windows"),
    ],
)
def test_a_bad_param_stops_every_stage_at_load(tmp_path, override, key):
    """Checked when the config loads, so even the first stage refuses it: one `error:`
    line naming the key, nothing written."""
    out = tmp_path / "original"
    proc = run_stage("download", override, f"paths.original={out}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert key in errors[0], errors
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_recipe_auto_budget_values_are_checked_at_load():
    base = ["recipe=auto"]
    for override, key in [
        ("budget.bits_per_weight=1.0", "budget.bits_per_weight"),
        ("budget.gib=-1", "budget.gib"),
        ("budget.fit.memory_gib=64", "budget.fit.context"),
        ("budget.router=4", "budget.router"),
    ]:
        with pytest.raises(TierquantError, match=re.escape(key)):
            validate(compose([*base, override]))
    with pytest.raises(TierquantError, match="tiers"):
        validate(compose([*base, "budget.gib=1", "tiers.q4=5"]))
    validate(compose([*base, "budget.bits_per_weight=3.5"]))


@pytest.mark.parametrize(
    "override", ["budget.gib=1", "budget.bits_per_weight=3.5", "budget.fit.memory_gib=64"]
)
def test_a_budget_with_a_hand_recipe_is_refused_at_load(override):
    """Only recipe=auto reads `budget`: with the seed recipe it would be silently ignored."""
    with pytest.raises(TierquantError, match=re.escape(override.split("=")[0])) as e:
        validate(compose([override]))
    assert "hand recipe" in str(e.value)
    validate(compose(["budget.router=8"]))  # the router setting has a default: not a budget


def test_conf_defaults_of_recipe_auto_compose_without_a_budget():
    """The card compares a run with conf/'s defaults for its recipe group: for recipe=auto
    that composition has no budget (each run gives its own), and must still type."""
    from tierquant.config import compose_defaults

    defaults = compose_defaults(["recipe=auto"])
    assert defaults["recipe"]["name"] == "auto" and defaults["budget"]["bits_per_weight"] is None
    with pytest.raises(TierquantError, match="exactly one budget"):
        validate(compose(["recipe=auto"]))


def test_quant_rounding_is_checked_at_load_naming_the_key():
    """quant.rounding: rtn (default) or gptq; the stage lists dvc.yaml reads are derived
    from it, and params that disagree (params.yaml edited by hand) are refused."""
    assert validate(compose()).quant.rounding == "rtn"
    gptq = validate(compose(["quant.rounding=gptq"])).quant
    assert gptq.stages["quantize"] == [] and gptq.stages["calibration"] == ["windows"]
    with pytest.raises(TierquantError, match="quant.rounding"):
        validate(compose(["quant.rounding=awq"]))
    stale = compose()
    stale["quant"]["rounding"] = "gptq"  # the derived lists still say rtn
    with pytest.raises(TierquantError, match="quant.rounding"):
        validate(stale)


def test_measure_rounding_is_rtn_or_gptq_and_gptq_needs_gptq_tiers():
    """measure.rounding: rtn (default, whatever quant.rounding) or gptq, which prices the
    bytes quantize_gptq writes and so needs quant.rounding=gptq; else refused by name."""
    assert validate(compose()).measure.rounding == "rtn"
    assert validate(compose(["quant.rounding=gptq"])).measure.rounding == "rtn"
    both = ["quant.rounding=gptq", "measure.rounding=gptq"]
    assert validate(compose(both)).measure.rounding == "gptq"
    with pytest.raises(TierquantError, match="measure.rounding is gptq but quant.rounding"):
        validate(compose(["measure.rounding=gptq"]))
    with pytest.raises(TierquantError, match="measure.rounding must be one of rtn, gptq"):
        validate(compose(["measure.rounding=auto"]))
