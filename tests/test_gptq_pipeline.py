"""quant.rounding=gptq in the pipeline (issue #29 phase 2): a gptq model of the tiny
shape loads with stock mlx-lm and generates, every file has rtn's size, and on the
calibration inputs every GPTQ-rounded module's output error is at most rtn's. The
DVC behaviour (`-S tiers.experts=4` reruns only that tier) is in the slow test below."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import copy_repo, run, shrink_calibration
from tierquant.build.gptq import GPTQ_KINDS
from tierquant.core.checkpoint import Checkpoint
from tierquant.core.floatrows import read_expert_bf16
from tierquant.core.gptoss import EXPERT_KINDS, mlx_weights, shape_of_checkpoint
from tierquant.core.gptq import dequantize, objective
from tierquant.core.mxfp4 import from_bf16_bits
from tierquant.quality.hessian import LayerInputs
from tierquant.quality.windows import read_windows


@pytest.fixture(scope="module")
def gptq_model(tiny_original, tmp_path_factory):
    """(config, root) of the tiny (random) model built with quant.rounding=gptq."""
    from tierquant.config import compose, validate
    from tierquant.pipeline import paths_under, run_stages

    root = tmp_path_factory.mktemp("gptq")
    config = paths_under(validate(compose(["quant.rounding=gptq"])), root, original=tiny_original)
    run_stages(config, ["calibration", "plan", "quantize", "assemble"])
    return config, root


def _sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors"}


def test_gptq_model_has_rtn_sizes_and_loads_and_generates(gptq_model, models):
    from mlx_lm import generate, load

    config, _ = gptq_model
    _, rtn_model, _ = models()
    model_dir = Path(config.paths.model)
    assert _sizes(model_dir) == _sizes(rtn_model)
    for tier in config.tiers:
        ours = Path(config.paths.quantized) / tier
        assert _sizes(ours) == _sizes(rtn_model.parent / "quantized" / tier), tier
    manifest = json.loads((Path(config.paths.quantized) / "experts" / "manifest.json").read_text())
    assert manifest["rounding"]["method"] == "gptq"
    assert manifest["rounding"]["calibration_tokens"] == read_windows(config.paths.calibration).size
    # bytes differ from rtn's where GPTQ rounded, and are rtn's elsewhere (bf16 tier)
    rtn_q = rtn_model.parent / "quantized"
    assert (Path(config.paths.quantized) / "experts").joinpath(
        "experts-00001-of-00001.safetensors"
    ).read_bytes() != (rtn_q / "experts" / "experts-00001-of-00001.safetensors").read_bytes()
    assert _tier_bytes(Path(config.paths.quantized) / "control") == _tier_bytes(rtn_q / "control")
    model, tokenizer = load(str(model_dir))
    text = generate(model, tokenizer, prompt="The", max_tokens=8)
    assert isinstance(text, str) and text


def test_lm_head_in_row_chunks_gives_the_same_bytes(gptq_model, tiny_original, monkeypatch):
    """The sensitive tier (lm_head among it) rounded with lm_head in row chunks of 32
    sharing one factor is byte for byte the tier rounded in one piece."""
    import tierquant.quality.hessian as hessian
    from tierquant.config import compose, validate
    from tierquant.pipeline import paths_under, stage_run

    config, root = gptq_model
    monkeypatch.setattr(hessian, "HEAD_ROWS", 32)
    assert shape_of_checkpoint(tiny_original).vocab_size > 32
    chunked = paths_under(
        validate(compose(["quant.rounding=gptq"])),
        root / "chunked",
        original=tiny_original,
        plan=Path(config.paths.plan),
        calibration=Path(config.paths.calibration),
    )
    stage_run("quantize_gptq")(chunked, tier="sensitive")
    ours = Path(config.paths.quantized) / "sensitive"
    manifest = json.loads((ours / "manifest.json").read_text())
    assert manifest["modules"]["lm_head"]["rounding"] == "gptq"
    assert _tier_bytes(Path(chunked.paths.quantized) / "sensitive") == _tier_bytes(ours)


def _tier_bytes(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.safetensors"))]


def _dequantized(tier_dir: Path, module: str, bits: int, group: int, expert=None) -> np.ndarray:
    with Checkpoint(tier_dir) as ck:
        parts = []
        for part in ("weight", "scales", "biases"):
            raw = ck.read_rows(f"{module}.{part}", 0, ck.info(f"{module}.{part}").shape[0])
            parts.append(raw[expert] if expert is not None else raw)
    return dequantize(*parts, bits=bits, group_size=group)


def test_gptq_objective_on_calibration_inputs_at_most_rtn_for_every_module_and_expert(
    gptq_model, models, tiny_original
):
    """‖X (W − Ŵ)ᵀ‖² on the module's own calibration inputs X: GPTQ's ≤ rtn's for every
    module (lm_head on the final normed hidden states), and for every expert of an
    expert module on the tokens routed to it."""
    config, _ = gptq_model
    _, rtn_model, _ = models()
    precisions = config.precisions()
    quantized = Path(config.paths.quantized)
    rtn_quantized = rtn_model.parent / "quantized"
    tiers = {
        t["name"].rsplit(".", 1)[0]: tier
        for tier in config.tiers
        for t in json.loads((Path(config.paths.plan) / f"{tier}.json").read_text())["tensors"]
    }
    weights = [
        w
        for w in mlx_weights(shape_of_checkpoint(tiny_original))
        if w.kind in GPTQ_KINDS and precisions[tiers[w.module]].mode == "affine"
    ]
    assert "lm_head" in {w.kind for w in weights}
    layers = {w.layer for w in weights if w.layer is not None}
    tokens = read_windows(config.paths.calibration)
    checked = 0
    with Checkpoint(tiny_original) as original:
        stream = LayerInputs.stream(tiny_original, tokens, batch_size=4, layers=layers, head=True)
        for inputs in stream:
            for w in (w for w in weights if w.layer == inputs.layer):
                p = precisions[tiers[w.module]]
                tier = tiers[w.module]
                experts = range(w.shape[0]) if w.kind in EXPERT_KINDS else [None]
                for e in experts:
                    if e is None:
                        ref = from_bf16_bits(original.read_rows(w.name, 0, w.shape[0]))
                        if w.kind == "lm_head":
                            x = inputs.rows
                        else:
                            x = inputs.attention if w.kind != "o_proj" else inputs.o_proj
                    else:
                        ref = from_bf16_bits(read_expert_bf16(original, w, e, e + 1)[0])
                        rows = inputs.experts if w.kind != "down_proj" else inputs.down_proj
                        x = rows[inputs.expert_ids == e]
                    args = (w.module, p.bits, p.group_size, e)
                    ours = objective(ref, _dequantized(quantized / tier, *args), x)
                    rtn = objective(ref, _dequantized(rtn_quantized / tier, *args), x)
                    assert ours <= rtn, (w.module, e, ours, rtn)
                    checked += 1
    assert checked == sum(w.shape[0] if w.kind in EXPERT_KINDS else 1 for w in weights) > 0


@pytest.mark.slow
def test_dvc_gptq_experiment_reruns_only_the_changed_tier(tmp_path):
    """`dvc exp run -S quant.rounding=gptq`, then `-S tiers.experts=4` on top: the second
    reruns quantize_gptq@experts and what follows, never the other tiers, the
    calibration windows, download or plan (the Hessians come from the original)."""
    repo = copy_repo(tmp_path / "repo")
    shrink_calibration(repo)
    env = {"PYTHONPATH": str(repo)}  # the copy's code, not the installed checkout's
    first = run(["dvc", "exp", "run", "-S", "quant.rounding=gptq", "assemble"], repo, env=env)
    assert "Running stage 'quantize_gptq@experts'" in first.stdout, first.stdout
    assert "Running stage 'calibration@windows'" in first.stdout
    assert "quantize@" not in first.stdout
    second = run(
        ["dvc", "exp", "run", "-S", "quant.rounding=gptq", "-S", "tiers.experts=4", "assemble"],
        repo,
        env=env,
    )
    ran = {line.split("'")[1] for line in second.stdout.splitlines() if "Running stage" in line}
    assert "quantize_gptq@experts" in ran and "assemble" in ran, second.stdout
    assert not ran & {
        "download",
        "plan@rules",
        "calibration@windows",
        "quantize_gptq@control",
        "quantize_gptq@sensitive",
        "quantize_gptq@attention",
    }, ran
