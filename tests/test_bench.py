"""machine + benchmark stages: a stable machine record, fit and bandwidth tables (tiny and
gpt-oss-120b's real shapes), a real benchmark run, and clean failures."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import pytest

from tests.conftest import run_stage
from tests.headers import real_spec
from tierquant.config import compose, validate
from tierquant.core.checkpoint import Checkpoint, TensorSpec
from tierquant.core.files import read_json, write_json
from tierquant.core.gptoss import GptOssShape, Weight, hf_tensor_specs, mlx_weights
from tierquant.errors import TierquantError
from tierquant.plan import footprint
from tierquant.plan.footprint import MemoryModel
from tierquant.plan.recipe import assign
from tierquant.report import benchmark as bench
from tierquant.report.benchmark import BenchmarkSettings
from tierquant.report.machine import machine_info, write_machine
from tierquant.source.synthetic import config_json

QUICK = {"contexts": [64, 128], "generate_tokens": 8, "trials": 1, "warmup": 1, "probe_mib": 64}


def _config(tmp_path: Path, original: Path, **benchmark):
    params = compose()
    params["paths"].update(
        original=str(original),
        machine=str(tmp_path / "machine.json"),
        benchmark=str(tmp_path / "benchmark"),
    )
    params["benchmark"].update(benchmark)
    return validate(params)


def _overrides(tmp_path: Path, original: Path) -> list[str]:
    quick = [f"benchmark.{k}={v}".replace(" ", "") for k, v in QUICK.items()]
    return [
        f"paths.original={original}",
        f"paths.machine={tmp_path / 'machine.json'}",
        f"paths.benchmark={tmp_path / 'benchmark'}",
        *quick,
    ]


# --- machine -----------------------------------------------------------------------------


def test_machine_json_is_byte_identical_across_runs(tmp_path):
    first = write_machine(tmp_path / "machine.json").read_bytes()
    second = write_machine(tmp_path / "machine.json").read_bytes()
    assert first == second
    info = json.loads(first)
    assert {"os", "cpu", "memory_gib", "mlx", "mlx_lm", "backend"} <= set(info)
    assert info["backend"] in ("cpu", "metal", "cuda")
    # nothing run-dependent: no times, no free memory, no measured speed
    assert not any(k in json.dumps(info).lower() for k in ("time", "free", "gbps", "avail"))
    # the stage script, in another process, writes the same bytes
    proc = run_stage("machine", f"paths.machine={tmp_path / 'stage.json'}")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "stage.json").read_bytes() == first
    assert machine_info() == info


# --- tables: tiny model ----------------------------------------------------------------


def test_tables_on_the_tiny_model(tiny_original):
    shape = GptOssShape.from_config(read_json(tiny_original / "config.json"))
    with Checkpoint(tiny_original) as ckpt:
        tensors = list(ckpt.tensors.values())
    size = footprint.stored_bytes(tensors)
    assert size["total"] == sum(t.nbytes for t in tensors)
    per_token = footprint.bytes_per_token(tensors, shape)
    k_over_e = shape.num_experts_per_tok / shape.num_local_experts
    assert per_token["experts"] == pytest.approx(size["experts"] * k_over_e)
    assert per_token["embed"] == shape.hidden_size * 2  # one bf16 row
    for part in ("attention", "router", "lm_head", "norms"):
        assert per_token[part] == size[part]

    # KV: 2 (k, v) x kv_heads x head_dim x 2 bytes per layer and token; sliding layers
    # stop growing at the window (tiny: 3 full + 3 sliding layers, window 32)
    per = 2 * shape.num_key_value_heads * shape.head_dim * 2
    assert footprint.kv_cache_bytes(shape, 10) == per * 6 * 10
    assert footprint.kv_cache_bytes(shape, 1000) == per * (3 * 1000 + 3 * 32)

    cfg = MemoryModel(memory_gib=[32, 64], overhead_gib=0.0)
    fit = footprint.fit_table(size["total"], shape, 131072, cfg)
    assert fit["sizes"]["64"]["max_context_default"] == 131072  # capped at the model's limit
    assert fit["sizes"]["32"]["gpu_limit_gib_default"] == pytest.approx(32 * 0.6667, abs=0.01)
    assert "iogpu.wired_limit_mb" in fit["rule"]


def test_max_context_matches_the_closed_form():
    shape = GptOssShape.from_config(config_json(real_spec("gpt-oss-120b")))
    budget = 3 * 2**30
    got = footprint.max_context(shape, budget, 10**9)
    per = 2 * 8 * 64 * 2
    # 18 full layers x c + 18 sliding layers x 128 <= budget
    assert got == (budget - per * 18 * 128) // (per * 18)
    assert footprint.kv_cache_bytes(shape, got) <= budget < footprint.kv_cache_bytes(shape, got + 1)
    assert footprint.max_context(shape, 100, 4096) == 0


# --- tables: gpt-oss-120b's real shapes (headers only, no data) ------------------------


# Quoted from the seed model card (M2 Max, generation tok/s), NOT measured here: the
# seed's 3.557-bit gpt-oss-120b and the original MXFP4 checkpoint.
SEED_CARD_QUOTE = {
    "source": "seed model card (quoted, not measured by this pipeline)",
    "chip": "M2 Max",
    "generation_tps": {"model": 48.2, "original": 43.9},
}


def precision_specs(
    shape: GptOssShape, bits_of: Callable[[Weight], Fraction | float]
) -> list[TensorSpec]:
    """Stored tensors (as U8 byte counts, mlx-lm names) of the bf16 checkpoint's weights
    at `bits_of(weight)` bits per weight (scales and biases included)."""
    specs = []
    for w in mlx_weights(shape):
        nbytes = Fraction(w.numel) * Fraction(bits_of(w)) / 8
        assert nbytes.denominator == 1, f"{w.name}: not a whole number of bytes"
        rows = w.shape[0]
        specs.append(TensorSpec(w.name, "U8", (rows, int(nbytes) // rows)))
    return specs


def recipe_bits(config, shape: GptOssShape) -> Callable[[Weight], Fraction]:
    """bits_of for `precision_specs` from the config's recipe and tiers (tierquant.plan.recipe)."""
    precisions = config.precisions()
    tiers = assign(mlx_weights(shape), config.recipe, shape.num_hidden_layers)
    tier_of = {w.name: tier for tier, weights in tiers.items() for w in weights}
    return lambda w: precisions[tier_of[w.name]].weight_bits(w.kind)


def _seed_bits(num_layers: int):
    """The seed recipe by hand (docs/gpt-oss-format.md): affine b bits + group 64 = b + 0.5 bits."""

    def bits_of(w: Weight) -> Fraction:
        if w.kind in ("norm", "bias", "sinks", "router"):
            return Fraction(16)
        if w.kind in ("embed_tokens", "lm_head", "v_proj", "o_proj"):
            return Fraction(13, 2)
        if w.kind in ("q_proj", "k_proj"):
            edge = w.layer < 6 or w.layer >= num_layers - 6
            return Fraction(13, 2) if edge or w.layer_type == "full_attention" else Fraction(9, 2)
        return Fraction(7, 2)  # experts: 3-bit

    return bits_of


def _by_formula_120b(seed: bool) -> float:
    """Bytes read per generated token of gpt-oss-120b, written out from the shapes."""
    L, E, k, H, I, V = 36, 128, 4, 2880, 2880, 201088  # noqa: E741, N806
    Q, KV, heads = 64 * 64, 8 * 64, 64  # noqa: N806
    b16 = 2.0
    if seed:
        edge_or_full = 6 + 6 + sum(1 for i in range(6, 30) if i % 2 == 1)  # q/k at 6-bit
        qk = (edge_or_full * 6.5 + (L - edge_or_full) * 4.5) / 8 * (Q * H + KV * H)
        vo = L * 6.5 / 8 * (KV * H + H * Q)
        expert_w = 3.5 / 8 * (2 * I * H + H * I)
        lm_head = 6.5 / 8 * V * H
        embed_row = 6.5 / 8 * H
    else:
        qk = L * b16 * (Q * H + KV * H)
        vo = L * b16 * (KV * H + H * Q)
        expert_w = (2 * I * H + H * I) * 4.25 / 8  # mxfp4: 4 bits + 1 scale byte per 32
        lm_head = b16 * V * H
        embed_row = b16 * H
    attn_vectors = L * b16 * (Q + 2 * KV + H + heads)
    router = L * b16 * (E * H + E)
    experts = L * k * (expert_w + b16 * (2 * I + H))
    norms = b16 * (2 * H * L + H)
    return qk + vo + attn_vectors + router + experts + norms + lm_head + embed_row


def test_bandwidth_table_for_gpt_oss_120b(capsys):
    shape = GptOssShape.from_config(config_json(real_spec("gpt-oss-120b")))
    config = validate(compose(["model=gpt-oss-120b"]))
    original = hf_tensor_specs(shape)
    by_hand = precision_specs(shape, _seed_bits(36))
    seed = precision_specs(shape, recipe_bits(config, shape))
    assert [(s.name, s.nbytes) for s in seed] == [(s.name, s.nbytes) for s in by_hand]

    # the seed card's size and the published original size
    seed_size = footprint.stored_bytes(seed)["total"]
    assert 8 * seed_size / footprint.weight_count(shape) == pytest.approx(3.557, abs=5e-4)
    assert seed_size / 2**30 == pytest.approx(48.4, abs=0.05)
    assert footprint.stored_bytes(original)["total"] == 65_248_815_744

    per_token = {
        "model": footprint.bytes_per_token(seed, shape),
        "original": footprint.bytes_per_token(original, shape),
    }
    assert per_token["model"]["total"] == pytest.approx(_by_formula_120b(seed=True), rel=1e-12)
    assert per_token["original"]["total"] == pytest.approx(_by_formula_120b(seed=False), rel=1e-12)

    quote = SEED_CARD_QUOTE
    chips = {quote["chip"]: 400.0}
    lines = [f"gpt-oss-120b, bandwidth bound at 400 GB/s ({quote['chip']}) vs {quote['source']}:"]
    for variant, pt in per_token.items():
        table = footprint.bandwidth_table(pt, shape, [1024, 4096], 128, chips)
        weights_only = 400e9 / pt["total"]
        measured = quote["generation_tps"][variant]
        for c, row in table["contexts"].items():
            bound = row["bound_tps"][quote["chip"]]
            assert bound < weights_only
            assert measured < bound  # nothing beats the memory bound
            lines.append(
                f"  {variant:8s} ctx {c:>4s}: {pt['total'] / 1e9:.3f} GB/token weights + "
                f"{row['kv_read_bytes'] / 1e6:.1f} MB KV -> bound {bound:.1f} tok/s; seed card "
                f"{measured} tok/s = {measured / bound:.0%} of the bound"
            )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    # fewer bytes per token is why the 3.557-bit model can be faster than the original
    assert per_token["model"]["total"] < 0.6 * per_token["original"]["total"]


# --- a real benchmark run ----------------------------------------------------------------


def _benchmark_original(config, original: Path) -> Path:
    """benchmark@original as the stage calls it, with `config`'s settings and paths."""
    return bench.benchmark(
        variant="original",
        model_dir=original,
        machine_path=Path(config.paths.machine),
        settings=config.benchmark,
        memory_model=config.memory,
        out_dir=Path(config.paths.benchmark),
    )


def test_benchmark_stage_on_the_tiny_original(tmp_path, tiny_original):
    config = _config(tmp_path, tiny_original, **QUICK)
    write_machine(Path(config.paths.machine))
    out = _benchmark_original(config, tiny_original)
    metrics = json.loads(out.read_text())
    assert metrics["variant"] == "original"
    assert set(metrics["speed"]) == {"64", "128"}
    for row in metrics["speed"].values():
        for key in ("prefill_tps", "generation_tps"):
            stats = row[key]
            assert 0 < stats["min"] <= stats["median"] <= stats["max"]
            assert stats["spread"] >= 0
        assert row["peak_memory_gib"] > 0
    assert metrics["memory"]["source"]
    assert metrics["load_s"] > 0
    assert metrics["size"]["tensor_bytes"] == sum(
        t.nbytes for t in Checkpoint(tiny_original).tensors.values()
    )
    assert metrics["bandwidth"]["machine"]["gbps"] > 0
    assert metrics["bandwidth"]["contexts"]["128"]["efficiency"] > 0
    assert set(metrics["fit"]["sizes"]) == {"32", "64", "96", "128", "192"}
    rows = json.loads((out.parent / "original_speed.json").read_text())
    assert [r["context"] for r in rows] == [64, 128]
    assert all(r["variant"] == "original" and r["generation_tps"] > 0 for r in rows)


# --- failures: one clear line, no traceback ---------------------------------------------


def test_context_longer_than_the_model_allows(tmp_path, tiny_original):
    cfg = replace(BenchmarkSettings(), contexts=[131000], generate_tokens=128)
    with pytest.raises(TierquantError, match="max_position_embeddings 131072"):
        bench.run_benchmark(tiny_original, cfg, MemoryModel())


def test_unloadable_model_fails_clearly(tmp_path, tiny_original):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_original, bad)
    config = read_json(bad / "config.json")
    config["model_type"] = "no_such_model"
    write_json(bad / "config.json", config)
    with pytest.raises(TierquantError, match="mlx_lm.load failed"):
        bench.run_benchmark(bad, BenchmarkSettings(**QUICK), MemoryModel())


def test_missing_model_dir_names_it(tmp_path):
    with pytest.raises(TierquantError, match="does not exist"):
        bench.run_benchmark(tmp_path / "model", BenchmarkSettings(**QUICK), MemoryModel())


@pytest.mark.parametrize("case", ["too_long", "unloadable", "missing_machine"])
def test_stage_script_fails_without_traceback(tmp_path, tiny_original, case):
    original = tiny_original
    overrides = _overrides(tmp_path, original)
    if case == "unloadable":
        original = tmp_path / "bad"
        shutil.copytree(tiny_original, original)
        (original / "tokenizer.json").write_text("{ not json")
        overrides = _overrides(tmp_path, original)
    if case != "missing_machine":
        (tmp_path / "machine.json").write_text("{}\n")
    if case == "too_long":
        overrides.append("benchmark.contexts=[200000]")
    proc = run_stage("benchmark", "variant=original", *overrides)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    expected = {
        "too_long": "max_position_embeddings",
        "unloadable": "mlx_lm.load failed",
        "missing_machine": "machine stage",
    }[case]
    assert expected in proc.stderr
    assert not (tmp_path / "benchmark" / "original.json").exists()


def test_a_model_that_cannot_fit_is_reported_not_loaded(tmp_path, tiny_original, monkeypatch):
    """On a machine that cannot give the model its bytes (faked: 1 MiB available), the
    benchmark says so from the headers and never loads it; exit 0 for the stage."""
    monkeypatch.setattr(bench, "memory_available", lambda: (1 << 20, "a fake small machine"))

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(bench, "load_model", no_load)
    config = _config(tmp_path, tiny_original, **QUICK)
    write_machine(Path(config.paths.machine))
    out = _benchmark_original(config, tiny_original)
    metrics = json.loads(out.read_text())
    check = metrics["memory_check"]
    with Checkpoint(tiny_original) as ckpt:
        resident = sum(i.nbytes for i in ckpt.tensors.values())
    need = (resident + config.memory.overhead_gib * 2**30) / 2**30
    assert check["fits"] is False and metrics["speed"] == {}
    assert check["verdict"] == f"does not fit: {need:.1f} GiB > {1 / 1024:.1f} GiB"
    assert check["available_from"] == "a fake small machine"


def test_memory_available_reads_this_machine():
    available, source = bench.memory_available()
    assert available > 0 and source
