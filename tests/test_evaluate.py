"""The quality gate on the tiny model: eval windows, reference, KLD metrics, structure.

Models are built in-process by the pipeline's own plan → quantize → assemble
(`tests.conftest.build_model`); the reference is the original tiny model's.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hubserver import LocalHub
from huggingface_hub import constants

from tests.conftest import REPO, copy_repo, run
from tierquant.check.structure import check_structure
from tierquant.check.validate import validate_model
from tierquant.config import EvalSet, compose, validate
from tierquant.errors import TierquantError
from tierquant.quality import evalset, evaluate

# Experts-only quantization: every other tier bf16 (runs on CPU: only experts need
# quantized gather_mm there).
EXPERTS_ONLY = ["tiers.sensitive=bf16", "tiers.attention=bf16"]


@pytest.fixture(scope="module")
def reference(tiny_original, tmp_path_factory) -> Path:
    """data/reference of the tiny original with the default eval config."""
    out = tmp_path_factory.mktemp("reference") / "reference"
    evaluate.build_reference(original=tiny_original, out=out, eval_config=validate(compose()).eval)
    return out


@pytest.fixture(scope="module")
def run_validate(tiny_original):
    """run_validate(config, model dir, plan dir, reference, out) on a model of the
    `models` fixture (its root holds plan/ and quantized/)."""

    def run_it(config, model_dir: Path, plan_dir: Path, reference: Path, out: Path):
        return validate_model(
            model_dir=model_dir,
            reference_dir=reference,
            plan_dir=plan_dir,
            original_dir=tiny_original,
            quantized_dir=plan_dir.parent / "quantized",
            tiers=config.precisions(),
            thresholds=config.validate,
            metrics_path=out,
        )

    return run_it


# --- eval set ---------------------------------------------------------------------------


def test_windows_are_deterministic_evenly_spread_and_disjoint(tiny_original):
    w = evalset.make_windows(np.arange(1000), 4, 100)
    assert w.dtype == np.int32 and w.shape == (4, 100)
    assert [int(r[0]) for r in w] == [0, 250, 500, 750]
    ev = EvalSet()
    a = evalset.eval_windows(ev, tiny_original)
    b = evalset.eval_windows(ev, tiny_original)
    assert a.shape == (16, 128) and np.array_equal(a, b)
    starts = sorted({tuple(r[:8]) for r in a})
    assert len(starts) == 16


def test_reference_holds_the_exact_windows(reference, tiny_original):
    ref = evaluate.load_reference(reference)
    assert np.array_equal(ref.tokens, evalset.eval_windows(EvalSet(), tiny_original))
    assert ref.topk_ids.shape == (16, 127, 64) and ref.nll.shape == (16, 127)
    assert np.all(np.diff(ref.topk_logp, axis=-1) <= 0)  # descending
    # argmax is stored apart from top-k: bf16 logits tie, and the two may break ties apart.
    hit = ref.topk_ids == ref.argmax[..., None]
    assert np.all(hit.any(axis=-1))
    assert np.array_equal(
        ref.topk_logp[hit.argmax(axis=-1)[..., None] == np.arange(64)],
        ref.topk_logp[..., 0].ravel(),
    )


def test_too_short_text_names_the_keys(tmp_path, tiny_original):
    short = tmp_path / "short.txt"
    short.write_text("It was the best of times, it was the worst of times. " * 20)
    ev = EvalSet(path=str(short))
    with pytest.raises(TierquantError, match=r"eval\.num_windows × eval\.window_length"):
        evalset.eval_windows(ev, tiny_original)
    with pytest.raises(TierquantError, match="eval.path"):
        evalset.load_eval_text(EvalSet(path=str(tmp_path / "missing.txt")))


@pytest.mark.parametrize(
    "override, named",
    [
        ("eval.source=web", "eval.source"),
        ("eval.source=hub", "eval.repo_id"),
        ("eval.num_windows=0", "eval.num_windows"),
        ("eval.window_length=1", "eval.window_length"),
        ("+eval.windows=3", "windows"),
    ],
)
def test_bad_eval_config_names_the_key(override, named):
    with pytest.raises(TierquantError, match=re.escape(named)):
        validate(compose([override]))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    for var in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with LocalHub() as server:
        yield server


def test_hub_dataset_source(hub):
    rows = [{"text": f"line {i}", "id": i} for i in range(3)]
    jsonl = "\n".join(json.dumps(r) for r in rows).encode()
    files = {
        "data/test-00000.jsonl": jsonl,
        "data/test-00001.jsonl": b'{"text": "last"}\n',
        "data/train-00000.jsonl": b'{"text": "not this"}\n',
        "plain.txt": b"plain text",
        "README.md": b"# eval\n",
    }
    sha = hub.add_commit("org/eval", files, repo_type="dataset")
    ev = EvalSet(source="hub", repo_id="org/eval", revision=sha, files="data/test-*.jsonl")
    assert evalset.load_eval_text(ev, endpoint=hub.endpoint) == "line 0\nline 1\nline 2\n\nlast"
    txt = EvalSet(source="hub", repo_id="org/eval", files="plain.txt")
    assert evalset.load_eval_text(txt, endpoint=hub.endpoint) == "plain text"
    assert ("GET", f"/datasets/org/eval/resolve/{sha}/data/test-00000.jsonl") in hub.requests
    for changes, named in [
        ({"files": "nothing-*.jsonl"}, "eval.files"),
        ({"revision": "v9"}, "eval.revision"),
        ({"repo_id": "org/none"}, "eval.repo_id"),
        ({"text_column": "body"}, "eval.text_column"),
    ]:
        bad = EvalSet(**{**vars(ev), **changes})
        with pytest.raises(TierquantError, match=re.escape(named)):
            evalset.load_eval_text(bad, endpoint=hub.endpoint)


# --- metrics ------------------------------------------------------------------------------


def test_original_against_itself_is_exactly_zero(reference, tiny_original):
    m = evaluate.quality_metrics(model_dir=tiny_original, reference_dir=reference)
    assert m["kld_mean"] == 0.0 and m["kld_max"] == 0.0
    assert m["top1_agreement"] == 1.0 and m["ppl_ratio"] == 1.0


def test_mxfp4_experts_are_lossless_and_validate_loads_only_the_model(
    reference, models, tmp_path, monkeypatch, run_validate
):
    config, model_dir, plan_dir = models(*EXPERTS_ONLY, "tiers.experts=mxfp4")
    loaded: list[Path] = []
    real = evaluate.StreamedModel

    def recording(path: Path, **kwargs):
        loaded.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(evaluate, "StreamedModel", recording)
    m = run_validate(config, model_dir, plan_dir, reference, tmp_path / "validate.json")
    assert loaded == [model_dir]  # never the original: the reference comes from disk
    assert m["kld_max"] < 1e-6 and m["top1_agreement"] == 1.0
    assert m["structure_problems"] == 0 and m["passed"] is True


def test_kld_grows_as_expert_bits_shrink(reference, models):
    results = {}
    for bits in (6, 4, 3, 2):
        _, model_dir, _ = models(*EXPERTS_ONLY, f"tiers.experts={bits}")
        results[bits] = evaluate.quality_metrics(model_dir=model_dir, reference_dir=reference)
    kld = [results[b]["kld_mean"] for b in (6, 4, 3, 2)]
    top1 = [results[b]["top1_agreement"] for b in (6, 4, 3, 2)]
    assert kld == sorted(kld) and len(set(kld)) == 4, kld
    assert top1 == sorted(top1, reverse=True), top1
    assert kld[3] > 10 * kld[0]


def _random_model_gate(config):
    """`config` with the gate the random tiny model (conftest's tiny_original) was
    calibrated for before #28; conf/quality/tiny.yaml now gates the trained model."""
    gate = dataclasses.replace(
        config.validate, kld_mean_max=1.2, kld_p99_max=4.0, top1_min=0.37, ppl_ratio_max=1.6
    )
    return dataclasses.replace(config, validate=gate)


def test_default_recipe_passes_and_2bit_experts_fail(reference, models, tmp_path, run_validate):
    config, model_dir, plan_dir = models()
    config = _random_model_gate(config)
    seed = run_validate(config, model_dir, plan_dir, reference, tmp_path / "seed.json")
    assert seed["passed"] and seed["structure_problems"] == 0
    assert seed["bits_per_weight"] == pytest.approx(seed["bits_per_weight_predicted"])

    config2, model2, plan2 = models("tiers.experts=2")
    config2 = _random_model_gate(config2)
    out = tmp_path / "e2.json"
    with pytest.raises(TierquantError) as failed:
        run_validate(config2, model2, plan2, reference, out)
    assert re.match(
        r"validate: (kld_mean|top1_agreement) = [\d.]+ (exceeds|is below) threshold [\d.]+ "
        r"\(validate\.(kld_mean_max|top1_min)\)",
        str(failed.value),
    )
    e2 = json.loads(out.read_text())  # written before the gate failed
    assert e2["passed"] is False
    assert e2["kld_mean"] > 1.5 * seed["kld_mean"]
    assert e2["top1_agreement"] < seed["top1_agreement"] - 0.1


def _zero_module(src: Path, dst: Path, module: str) -> Path:
    """Copy `src` (fresh files) with `module`'s dequantized weights zeroed."""
    import mlx.core as mx

    shutil.copytree(src, dst)
    weight_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    for suffix in ("scales", "biases"):
        name = f"{module}.{suffix}"
        shard = dst / weight_map[name]
        tensors, meta = mx.load(str(shard), return_metadata=True)
        tensors[name] = mx.zeros_like(tensors[name])
        shard.unlink()
        mx.save_safetensors(str(shard), tensors, metadata=meta)
    return dst


def test_a_zeroed_expert_tensor_fails_naming_the_metric(reference, models, tmp_path, run_validate):
    config, model_dir, plan_dir = models()
    broken = _zero_module(model_dir, tmp_path / "model", "model.layers.0.mlp.experts.gate_proj")
    out = tmp_path / "validate.json"
    with pytest.raises(TierquantError, match=r"validate: kld_mean = [\d.]+ exceeds threshold") as e:
        run_validate(config, broken, plan_dir, reference, out)
    # The whole tensor is zeroed: the integrity check names it too.
    assert "integrity: 1 tensor(s)" in str(e.value)
    assert "model.layers.0.mlp.experts.gate_proj.weight (expert 0)" in str(e.value)
    metrics = json.loads(out.read_text())
    assert metrics["passed"] is False and metrics["structure_problems"] == 0


def test_topk_estimate_is_a_lower_bound_within_its_error_bound(tiny_original, models):
    tokens = evalset.make_windows(
        evalset.tokenize(evalset.load_eval_text(EvalSet()), tiny_original), 4, 64
    )
    exact = evaluate.streamed_reference(tiny_original, tokens, top_k=1024, batch_size=4)
    top16 = evaluate.streamed_reference(tiny_original, tokens, top_k=16, batch_size=4)
    assert np.all(np.isneginf(exact.tail_logp)) and top16.meta["tail_mass_mean"] > 0
    _, model_dir, _ = models(*EXPERTS_ONLY, "tiers.experts=3")
    full = evaluate.streamed_token_stats(model_dir, exact, batch_size=4)
    est = evaluate.streamed_token_stats(model_dir, top16, batch_size=4)
    assert np.all(full.tail_bound == 0)
    gap = full.kld.astype(np.float64) - est.kld
    assert gap.min() > -1e-5  # the estimate never exceeds the exact KL
    assert np.all(gap <= est.tail_bound + 1e-5)  # and is within its stated bound
    assert gap.mean() < 0.25 * full.kld.mean()


# --- structure ----------------------------------------------------------------------------


def test_structure_flags_wrong_bits_config_and_nonfinite(models, tmp_path):
    import mlx.core as mx

    config, model_dir, plan_dir = models()
    assert check_structure(model_dir, plan_dir, config.precisions()).problems == []
    # The model of experts=3 checked against tiers.experts=4: shapes and config disagree.
    wrong = validate(compose(["tiers.experts=4"])).precisions()
    problems = check_structure(model_dir, plan_dir, wrong).problems
    joined = "\n".join(problems)
    assert "model.layers.0.mlp.experts.gate_proj.weight: U32" in joined
    assert "holds 3 bits" in joined and "tiers.experts" in joined
    assert "quantization['model.layers.0.mlp.experts.gate_proj']" in joined
    assert any("bits_per_weight" in p for p in problems)
    # A NaN in a bf16 tensor.
    broken = tmp_path / "nan"
    shutil.copytree(model_dir, broken)
    weight_map = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.sinks"
    shard = broken / weight_map[name]
    tensors, meta = mx.load(str(shard), return_metadata=True)
    tensors[name] = mx.where(mx.arange(tensors[name].size) == 1, mx.nan, tensors[name]).astype(
        tensors[name].dtype
    )
    shard.unlink()
    mx.save_safetensors(str(shard), tensors, metadata=meta)
    report = check_structure(broken, plan_dir, config.precisions())
    assert report.nonfinite_tensors == 1
    assert report.problems == [f"{name}: 1 NaN/Inf value(s)"]


# --- pipeline -----------------------------------------------------------------------------


def test_reference_stage_reads_only_eval_params():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["reference"]["params"] == ["eval"]
    deps = " ".join(stages["reference"]["deps"])
    for other in ("plan", "quantized", "model", "float", "recipe"):
        assert other not in deps.replace("paths.original", "")


@pytest.mark.slow
def test_tier_experiment_does_not_rerun_reference(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    run(["dvc", "repro", "reference"], repo)
    assert (repo / "data/reference/meta.json").is_file()
    proc = run(["dvc", "exp", "run", "-S", "tiers.experts=4", "reference"], repo)
    assert "Stage 'reference' didn't change, skipping" in proc.stdout, proc.stdout
    assert "Running stage 'reference'" not in proc.stdout
