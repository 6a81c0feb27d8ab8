"""The model card: built from this run's metrics files, read back by ModelCard.load."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from stages.card import run as build_card  # the stage's call of tierquant.report.card.build_card
from tests.conftest import build_model
from tierquant.config import compose, compose_defaults, config_dict, project_root, validate
from tierquant.plan.footprint import MemoryModel
from tierquant.report.benchmark import VARIANTS, Measured, benchmark_report, write_benchmark
from tierquant.report.card import TEMPLATE, layer_ranges, module_summary
from tierquant.report.provenance import override_value, params_diff, repro_command

ROOT = Path(__file__).resolve().parents[1]
QUALITY = {
    "kld_mean": 0.123456,
    "kld_median": 0.0987,
    "kld_p99": 1.875,
    "kld_p99_9": 2.5,
    "kld_max": 3.25,
    "top1_agreement": 0.8125,
    "ppl_reference": 10.5,
    "ppl_model": 11.0,
    "ppl_ratio": 1.047619,
    "kld_mean_stderr": 0.00321,
    "tokens": 2032,
    "windows": 16,
    "top_k": 64,
    "structure_problems": 0,
    "passed": True,
}


def _gate(passed_mean: bool = True) -> list[dict]:
    """validate.json's `gate` (SCHEMA.md): one entry per threshold param."""
    return [
        {
            "param": "validate.kld_mean_max",
            "metric": "kld_mean",
            "op": "<=",
            "threshold": 0.8,
            "value": 0.123456 if passed_mean else 0.95,
            "passed": passed_mean,
        },
        {
            "param": "validate.top1_min",
            "metric": "top1_agreement",
            "op": ">=",
            "threshold": 0.5,
            "value": 0.8125,
            "passed": True,
        },
        {
            "param": "validate.kld_max_max",
            "metric": "kld_max",
            "op": "<=",
            "threshold": None,
            "value": 3.25,
            "passed": None,
        },
    ]


QUALITY["gate"] = _gate()


BENCH = {"contexts": [128, 512], "generate_tokens": 32, "trials": 1, "warmup": 1}
MACHINE = {"cpu": "Test CPU", "backend": "cpu", "memory_gib": 24}


def _write_bench(out_dir: Path, variant: str, model_dir: Path, gen: float) -> dict:
    """Write benchmark files with tierquant.report.benchmark's own report and writer, from chosen
    measurements (the tables are computed from `model_dir`'s headers); the metrics."""
    cfg = replace(validate(compose()).benchmark, **BENCH)  # conf/'s chips
    k = {128: 1, 512: 2}
    measured = Measured(
        load_s=0.5,
        memory_source="test",
        after_load_bytes=1 << 20,
        runs={
            c: [
                {
                    "prefill_tps": 111.5 * k[c] + (variant == "model"),
                    "generation_tps": gen * k[c],
                    "peak_bytes": int(0.0045 * k[c] * 2**30),
                }
            ]
            for c in cfg.contexts
        },
        seconds=dict.fromkeys(cfg.contexts, 1.0),
        bandwidth={"gbps": 18.26},
    )
    metrics, rows = benchmark_report(model_dir, cfg, MemoryModel(), MACHINE, measured)
    return json.loads(write_benchmark(out_dir, variant, metrics, rows).read_text())


@pytest.fixture(scope="module")
def run_dir(tiny_original: Path, tiny_float: Path, tmp_path_factory) -> Path:
    """plan → quantize → assemble of the tiny model, plus metrics files."""
    root = tmp_path_factory.mktemp("card")
    build_model(root, tiny_original, tiny_float)
    (root / "validate.json").write_text(json.dumps(QUALITY))
    _write_bench(root / "benchmark", "model", root / "model", 42.25)
    _write_bench(root / "benchmark", "original", tiny_original, 33.75)
    return root


def _config(root: Path, *overrides: str):
    paths = {
        "plan": root / "plan",
        "model": root / "model",
        "size_metrics": root / "size.json",
        "validate": root / "validate.json",
        "benchmark": root / "benchmark",
        "machine": root / "machine.json",
        "card": root / "card",
        "predict": root / "predicted.json",  # absent: a hand recipe's card says no budget
        "sweep": root / "sweep",  # absent: no sweep
    }
    return validate(compose([*overrides, *(f"paths.{k}={v}" for k, v in paths.items())]))


def test_card_numbers_come_from_the_metrics(run_dir: Path) -> None:
    path = build_card(_config(run_dir, "publish.namespace=someone"))
    text = path.read_text()
    size = json.loads((run_dir / "size.json").read_text())
    # quantization table: every tier, its exact params/bytes and percentages
    for tier, t in size["tiers"].items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {tier} |"))
        assert f"{t['params']:,}" in row and f"{t['bytes']:,}" in row
        assert f"{t['params_pct']:.3f}%" in row and f"{t['bytes_pct']:.3f}%" in row
        assert t["precision"] in row
    assert f"{size['total']['bits_per_weight']:.3f} bits per weight" in text
    assert f"{size['original']['bytes']:,}" in text
    assert "down_proj, gate_proj, up_proj (all 6 layers)" in text
    # quality, speed, fit and bandwidth tables
    for needle in (
        "0.1235 ± 0.0032",
        "0.8125",
        "1.0476",
        "≤ 0.8 ✓",
        "≥ 0.5 ✓",
        "Quality gate: passed",
    ):
        assert needle in text, needle
    assert "| 128 | 112.5 | 111.5 | 42.2 | 33.8 |" in text  # prefill / generation medians
    assert "Test CPU, 24 GiB" in text
    assert "| 64 | 48.0 | yes | 131,072 | 56.0 | yes | 131,072 |" in text
    bench = {v: json.loads((run_dir / "benchmark" / f"{v}.json").read_text()) for v in VARIANTS}
    # the tiny model reads ~2 MB per token: no bandwidth bound quoted, and it says why
    assert f"{round(bench['model']['bandwidth']['bytes_per_token']['total']):,} bytes" in text
    assert "Not quoted" in text and "| M2 Max |" not in text
    assert "| KLD max | 3.2500 |  |" in text  # a null threshold: no verdict
    assert "speed.png" in text and (run_dir / "card" / "speed.png").read_bytes()[:4] == b"\x89PNG"
    assert "No Hub namespace" not in text
    # usage and reproduction
    assert 'load("someone/tiny-tierquant-seed")' in text and "apply_chat_template" in text
    assert "git checkout" in text and "params hash" in text


def test_model_card_load_reads_the_same_metadata(run_dir: Path) -> None:
    path = build_card(_config(run_dir))
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "mlx" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    assert {"mlx", "gpt_oss", "quantized", "3-bit", "4-bit", "6-bit"} <= set(data["tags"])
    assert "base_model" not in data  # synthetic: no Hub base model to point at
    assert str(card).strip() == path.read_text().strip()


def test_hub_model_card_names_its_base_model(run_dir: Path) -> None:
    config = _config(run_dir, "model=gpt-oss-120b", "publish.repo_id=org/m")
    card = ModelCard.load(build_card(config))
    assert card.data.base_model == "openai/gpt-oss-120b"
    assert card.data.to_dict()["base_model_relation"] == "quantized"
    assert "# org/m" in card.text and "-S model=gpt-oss-120b" in card.text


def test_card_states_a_failed_validation(run_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "validate.json"
    bad.write_text(json.dumps({**QUALITY, "kld_mean": 0.95, "gate": _gate(False), "passed": False}))
    config = _config(run_dir)
    config.paths.validate = str(bad)
    config.validate.kld_mean_max = 5.0  # the card shows validate's verdict, not its own
    text = build_card(config).read_text()
    assert "Quality gate: FAILED" in text and "KLD mean 0.95 vs limit ≤ 0.8" in text
    assert "| KLD mean | 0.9500 ± 0.0032 | ≤ 0.8 ✗ FAILED |" in text


def test_card_shows_the_verdict_validate_wrote(run_dir: Path, tmp_path: Path) -> None:
    """passed: false with every gate entry passing (e.g. a structure problem): failed."""
    bad = tmp_path / "validate.json"
    bad.write_text(json.dumps({**QUALITY, "structure_problems": 2, "passed": False}))
    config = _config(run_dir)
    config.paths.validate = str(bad)
    text = build_card(config).read_text()
    assert "Quality gate: FAILED" in text and "2 structural problems" in text


def test_card_without_namespace_uses_the_bare_name(run_dir: Path) -> None:
    text = build_card(_config(run_dir)).read_text()
    assert "# tiny-tierquant-seed" in text and 'load("tiny-tierquant-seed")' in text
    assert "publish.namespace=<user or org>" in text and "<namespace>" not in text


def test_card_renders_without_benchmark_or_validation(run_dir: Path, tmp_path: Path) -> None:
    config = _config(run_dir)
    config.paths.validate = str(tmp_path / "none.json")
    config.paths.benchmark = str(tmp_path / "none")
    text = build_card(config).read_text()
    assert "Quality gate: not run" in text and "Not measured" in text
    assert not (Path(config.paths.card) / "speed.png").exists()
    ModelCard.load(Path(config.paths.card) / "README.md")


def test_params_diff_and_repro_command(run_dir: Path) -> None:
    diff = params_diff(
        config_dict(_config(run_dir, "tiers.experts=4")), compose_defaults, project_root()
    )
    keys = [k for k, _, _ in diff["changed"]]
    assert "tiers.experts" in keys
    assert "tiers.experts=4" in diff["overrides"]
    assert repro_command(["tiers.experts=4"]) == "dvc exp run -S tiers.experts=4"
    diff = params_diff(
        config_dict(validate(compose(["recipe=mixed_3_6"]))), compose_defaults, project_root()
    )
    assert diff["overrides"] == ["recipe=mixed_3_6"] and diff["changed"] == []
    assert (
        params_diff(config_dict(validate(compose())), compose_defaults, project_root())["overrides"]
        == []
    )
    assert repro_command([]) == "dvc repro"
    assert override_value("1/4") == "1/4" and override_value("a b") == "'a b'"
    assert override_value(None) == "null" and override_value([1, 2]) == "[1,2]"
    assert repro_command(["eval.path='a b'"]) == "dvc exp run -S 'eval.path='\"'\"'a b'\"'\"''"


def test_layer_ranges_and_module_summary() -> None:
    assert layer_ranges([0, 1, 2, 3], 4) == "all 4 layers"
    assert layer_ranges([0, 1, 3, 5, 6, 7], 36) == "layers 0–1, 3, 5–7"
    assert layer_ranges([4], 36) == "layer 4"
    tensors = [
        {"module": "lm_head", "kind": "lm_head", "layer": None},
        {"module": "model.layers.0.self_attn.q_proj", "kind": "q_proj", "layer": 0},
        {"module": "model.layers.0.self_attn.k_proj", "kind": "k_proj", "layer": 0},
    ]
    assert module_summary(tensors, 2) == "lm_head; k_proj, q_proj (layer 0)"


def test_template_ships_as_package_data() -> None:
    assert TEMPLATE.is_file() and TEMPLATE.parent.name == "templates"
    pyproject = (ROOT / "pyproject.toml").read_text()
    line = re.search(r"^tierquant = \[.*\]$", pyproject, re.MULTILINE)
    assert line is not None and '"templates/*"' in line.group(0)


def test_card_states_the_budget_and_where_it_sits_on_the_sweep(run_dir: Path, tmp_path) -> None:
    """recipe=auto: the budget and its fit from predict's metrics; the sweep's curve from
    `tierquant sweep`'s points, with this model placed on it."""
    size = json.loads((run_dir / "size.json").read_text())
    bpw = size["total"]["bits_per_weight"]
    predicted = {
        **size,
        "budget": {
            "fit": {
                "memory_gib": 64,
                "context": 32768,
                "wired_limit": "raised",
                "gpu_limit_gib": 56.0,
                "overhead_gib": 2.0,
                "kv_cache_bytes": 3 * 2**29,
            },
            "max_bytes": 2**31,
            "max_gib": 2.0,
            "slack_bytes": 2**31 - size["total"]["bytes"],
            "slack_gib": 1.998,
            "predicted_damage": 0.0405,
        },
    }
    (tmp_path / "predicted.json").write_text(json.dumps(predicted))
    points = [
        {
            "name": "small",
            "recipe": "auto",
            "budget": "3.0 bpw",
            "bits_per_weight": 3.0,
            "kld_mean": 0.9,
            "top1_agreement": 0.4,
        },
        {
            "name": "this-one",
            "recipe": "seed",
            "budget": "hand recipe",
            "bits_per_weight": bpw,
            "kld_mean": QUALITY["kld_mean"],
            "top1_agreement": 0.8125,
        },
        {
            "name": "big",
            "recipe": "mixed_3_6",
            "budget": "hand recipe",
            "bits_per_weight": bpw + 0.5,
            "kld_mean": 0.5,
            "top1_agreement": 0.5,
        },
    ]
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "points.json").write_text(json.dumps(points))
    config = _config(run_dir)
    config.paths.predict = str(tmp_path / "predicted.json")
    config.paths.sweep = str(tmp_path / "sweep")
    config.paths.card = str(tmp_path / "card")
    text = build_card(config).read_text()
    assert "fit a 64 GB Mac with a 32,768-token context (raised wired limit)" in text
    weights = size["total"]["bytes"] / 2**30
    used = weights + 1.5 + 2.0
    assert f"= {used:.3f} GiB, within the\n56.000 GiB the GPU may use on a 64 GB Mac" in text
    assert "predicted damage 0.0405 nats/token" in text
    assert "Among the 3 models" in text and "is on the Pareto front" in text
    assert "it beats 1 that are no\nsmaller" in text
    assert f"| **this-one (this)** | {bpw:.4f} | 0.1235 |" in text
    # the curve drawn beside the table, this model starred
    chart = tmp_path / "card" / "curve.png"
    assert "](curve.png)" in text and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert chart.stat().st_size > 10_000
    # a better model no larger than this one: not on the front, and the card says which
    points[0].update(bits_per_weight=bpw - 0.1, kld_mean=0.05)
    (tmp_path / "sweep" / "points.json").write_text(json.dumps(points))
    text = build_card(config).read_text()
    assert "is not on the Pareto front: small has a lower KLD\n(0.0500)" in text


def test_a_hand_recipe_without_a_sweep_says_neither(run_dir: Path) -> None:
    text = build_card(_config(run_dir)).read_text()
    assert "Bits allocated by measurement" not in text and "size/quality curve" not in text
    assert "curve.png" not in text


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 3)
    return text[start : end if end > 0 else None]


def test_card_names_its_eval_text_use_limits_and_tools(run_dir: Path) -> None:
    """The eval text (bundled file, or a Hub dataset with its revision) and its token
    count, intended use, limitations, and the tool versions the machine stage recorded."""
    (run_dir / "machine.json").write_text(
        json.dumps({**MACHINE, "mlx": "9.8.7", "mlx_lm": "6.5.4"})
    )
    try:
        text = build_card(_config(run_dir)).read_text()
    finally:
        (run_dir / "machine.json").unlink()
    quality = _section(text, "Quality vs the original")
    assert "2,032 tokens (16 windows) of tierquant's bundled `tierquant/assets/corpus.txt`" in (
        " ".join(quality.split())
    )
    from tierquant import __version__  # the card stage passes it

    assert f"Made with tierquant {__version__}, mlx-lm 6.5.4 (mlx 9.8.7)." in text
    assert "Testing and demonstrating the pipeline" in _section(text, "Intended use")
    limits = " ".join(_section(text, "Limitations").split())
    assert "2,032 tokens of one text, tierquant's bundled" in limits
    assert "top-64 tokens plus a rest bin" in limits

    hub = build_card(
        _config(
            run_dir,
            "eval.source=hub",
            "eval.repo_id=someone/texts",
            "eval.revision=0123abc",
            "eval.files=eval.jsonl",
        )
    ).read_text()
    assert "of the Hub dataset `someone/texts` at revision `0123abc`, files `eval.jsonl`" in (
        " ".join(hub.split())
    )


def test_cpu_backend_speeds_carry_a_note(run_dir: Path, tmp_path: Path) -> None:
    """A benchmark on MLX's CPU backend says its speeds say nothing about Metal; one on
    Metal does not."""
    cpu = _section(build_card(_config(run_dir)).read_text(), "Speed: this model vs the original")
    assert "MLX's **CPU backend**" in cpu and "nothing about speed on a Mac" in cpu
    (tmp_path / "machine.json").write_text(json.dumps({**MACHINE, "backend": "metal"}))
    config = _config(run_dir)
    paths = replace(config.paths, machine=str(tmp_path / "machine.json"), card=str(tmp_path / "c"))
    metal = build_card(replace(config, paths=paths)).read_text()
    assert "CPU backend" not in metal


def test_card_says_which_rounding_on_what_calibration_text(run_dir: Path) -> None:
    assert "Rounding: round to nearest" in build_card(_config(run_dir)).read_text()
    text = build_card(_config(run_dir, "quant.rounding=gptq")).read_text()
    cal = _config(run_dir).calibration
    tokens = cal.num_windows * cal.window_length
    assert "Rounding: GPTQ" in text and f"{tokens:,} calibration tokens" in text
    assert "expert and lm_head matrices" in text and "Embeddings: round to nearest" in text
    assert "tierquant/assets/corpus.txt" in text
    # the lists conf/ derives from quant.rounding are not overrides of their own
    assert "-S quant.rounding=gptq\n" in text and "quant.stages" not in text


def test_card_states_an_original_that_does_not_fit(run_dir: Path, tmp_path: Path) -> None:
    """The seed card's own row: on a machine too small for the original, the benchmark
    records "does not fit: X GiB > Y GiB" and the card shows it in the original's column."""
    bench_dir = tmp_path / "benchmark"
    bench_dir.mkdir()
    (bench_dir / "model.json").write_text((run_dir / "benchmark" / "model.json").read_text())
    verdict = "does not fit: 65.3 GiB > 48.0 GiB"
    original = {
        "variant": "original",
        "speed": {},
        "memory_check": {"fits": False, "verdict": verdict, "available_from": "Metal's"},
    }
    (bench_dir / "original.json").write_text(json.dumps(original))
    config = _config(run_dir)
    paths = replace(config.paths, benchmark=str(bench_dir), card=str(tmp_path / "card"))
    text = build_card(replace(config, paths=paths)).read_text()
    start = text.index("## Speed")
    speed = text[start : text.index("\n## ", start + 3)]
    rows = [line for line in speed.splitlines() if re.match(r"\| [0-9,]+ \|", line)]
    assert rows and all(row.rstrip(" |").endswith(verdict) for row in rows), speed
    assert f"The original: {verdict}" in speed
