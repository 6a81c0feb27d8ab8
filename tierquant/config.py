"""Typed schema of params.yaml, validation at load, and composition of conf/.

Hydra composes `conf/` into `params.yaml` (`dvc exp run` does so on every run;
`python -m tierquant.config --write` does so by hand). Stages read params.yaml and
validate it here, so an unknown key or a wrong type fails at once, naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tierquant.check.validate import QualityGate
from tierquant.core.precision import ROUNDINGS, Precision, parse_candidates, parse_tiers
from tierquant.errors import TierquantError
from tierquant.plan.autotiers import check_auto_tiers, router_precision
from tierquant.plan.budget import BudgetRequest, check_budget
from tierquant.plan.footprint import MemoryModel
from tierquant.plan.recipe import RecipeConfig, check_recipe, typed_rules
from tierquant.quality.evalset import CalibrationSet, EvalSet, TextSet
from tierquant.report.benchmark import BenchmarkSettings
from tierquant.report.release import default_repo_id
from tierquant.source.synthetic import SYNTHETIC_WEIGHTS, SyntheticSpec


def project_root(start: Path | None = None) -> Path:
    """The project checkout to work in: the nearest folder at or above `start` (default:
    the current directory, where DVC runs stages) holding dvc.yaml and conf/.

    Never the folder the package was installed from: an editable install serves every
    clone of the repo (tests run the pipeline in temporary copies).
    """
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "conf").is_dir():
            return folder
    raise TierquantError(
        f"{here} is not inside a tierquant checkout (no dvc.yaml and conf/ above it); "
        "run from the repository root"
    )


@dataclass
class ModelConfig:
    """Which checkpoint the pipeline starts from."""

    name: str = "tiny"
    source: str = "synthetic"  # "synthetic" or "hub"
    repo_id: str | None = None
    revision: str | None = None
    license: str = "apache-2.0"
    allow_patterns: list[str] = field(default_factory=list)
    max_shard_bytes: int = 5_000_000_000  # cap for the checkpoints we write (convert, model)
    synthetic: SyntheticSpec | None = None


@dataclass
class PathsConfig:
    original: str = "data/original"
    float: str = "data/float"
    plan: str = "data/plan"
    predict: str = "metrics/predicted_size.json"
    quantized: str = "data/quantized"  # one folder per tier
    model: str = "data/model"
    size_metrics: str = "metrics/size.json"
    quant_error_plot: str = "metrics/quant_error.csv"
    reference: str = "data/reference"
    validate: str = "metrics/validate.json"
    machine: str = "data/machine.json"
    benchmark: str = "data/benchmark"
    card: str = "data/card"  # holds README.md
    headline: str = "metrics/headline"  # the DVC metrics: quality.json, model.json, original.json
    publish: str = "data/publish.json"
    calibration: str = "data/calibration.npy"  # recipe=auto: the calibration windows
    measure: str = "data/measure"  # damage per allocation group x precision (measure stage)
    measure_plot: str = "metrics/measure_damage.csv"  # the same, for the dvc plots heatmap
    pareto: str = "metrics/pareto.json"  # this run's (bpw, kld_mean, top-1) for the sweep plot
    sweep: str = "sweep"  # the Pareto sweep's folder (tierquant.report.sweep), for the card
    check: str = "metrics/checked.txt"  # the check stage's stamp (constant bytes)


@dataclass
class MeasureConfig:
    """Candidate precisions the `measure` stage scores for each allocation group:
    affine bits (at quant.group_size) and `mxfp4` (expert groups only)."""

    candidates: list[Any] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8, "mxfp4"])
    # Later layers a group's perturbation is carried through before it is projected onto
    # the last hidden state (tierquant.quality.measure): None = every one (end to end).
    carry_layers: int | None = None
    # How the affine candidates of decoder groups are rounded when scored: rtn, or gptq
    # (quantize_gptq's bytes; needs quant.rounding gptq). rtn for gptq tiers too by
    # default: on the tiny model gptq scoring allocated no better (docs/gptq.md) and at
    # gpt-oss-120b it costs ~29-36 CPU-hours of GPTQ.
    rounding: str = "rtn"


@dataclass
class QuantConfig:
    """Affine quantization settings shared by every integer-bits tier."""

    group_size: int = 64  # 32, 64 or 128 (mx.quantize)
    rounding: str = "rtn"  # rtn (mx.quantize) | gptq (tierquant.build.gptq)
    # dvc.yaml's foreach lists for the rounding, derived in conf/config.yaml
    # (`stages: ${quant.by_rounding.${quant.rounding}}`); checked by `_check_rounding`
    stages: dict[str, list[str]] = field(default_factory=dict)
    by_rounding: dict[str, dict[str, list[str]]] = field(default_factory=dict)


@dataclass
class PublishConfig:
    """Where and how tierquant.report.publish pushes data/model + the card (dry run by default).

    `repo_id` null means `<namespace>/<model.name>-tierquant-<recipe.name>`. `create_pr`
    opens a pull request against main (so `revision` must stay main); `tag` tags the
    published commit. `push` false writes only the dry-run receipt.
    """

    repo_id: str | None = None
    namespace: str | None = None
    revision: str = "main"
    private: bool = False
    create_pr: bool = False
    tag: str | None = None
    push: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    eval: EvalSet = field(default_factory=EvalSet)
    calibration: CalibrationSet = field(default_factory=CalibrationSet)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    budget: BudgetRequest = field(default_factory=BudgetRequest)
    validate: QualityGate = field(default_factory=QualityGate)
    memory: MemoryModel = field(default_factory=MemoryModel)
    benchmark: BenchmarkSettings = field(default_factory=BenchmarkSettings)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    # tier -> precision: int bits (affine, quant.group_size), 16/bf16, or mxfp4;
    # parsed by tierquant.core.precision.parse_tiers (Config.precisions()).
    tiers: dict[str, Any] = field(default_factory=dict)
    quant: QuantConfig = field(default_factory=QuantConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def repo_id(self) -> str:
        """The Hub repository this build is for (`publish.repo_id` or its default)."""
        pub = self.publish
        return default_repo_id(pub.repo_id, pub.namespace, self.model.name, self.recipe.name)

    def precisions(self) -> dict[str, Precision]:
        """`tiers` parsed: tier name -> tierquant.core.precision.Precision, in order."""
        return parse_tiers(self.tiers, self.quant.group_size)


def validate(cfg: DictConfig | dict, *, runnable: bool = True) -> Config:
    """Merge `cfg` onto the schema: unknown keys and wrong types raise, naming the key.
    `runnable=False` types a composition that is not itself a run (conf/'s defaults for
    `recipe=auto`, which has no budget yet): the budget's presence is not required."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, cfg)
        config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise TierquantError(
            f"params: invalid config{f' key {key!r}' if key else ''}: {_first_line(e)}. "
            "Check params.yaml / conf/ or your key=value override."
        ) from None
    _check_semantics(config, runnable=runnable)
    return config


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _check_semantics(config: Config, *, runnable: bool = True) -> None:
    _check_eval(config.eval)
    _check_eval(config.calibration, "calibration")
    _check_benchmark(config.benchmark)
    _check_memory(config.memory)
    _check_validate(config.validate)
    _check_model_sizes(config.model)
    _check_recipe_and_tiers(config, runnable=runnable)
    _check_rounding(config)
    model = config.model
    if model.source == "synthetic":
        if model.synthetic is None:
            raise TierquantError("params: model.source is 'synthetic' but model.synthetic is null")
        if model.synthetic.weights not in SYNTHETIC_WEIGHTS:
            raise TierquantError(
                f"params: model.synthetic.weights must be one of {SYNTHETIC_WEIGHTS}, "
                f"got {model.synthetic.weights!r}"
            )
    elif model.source == "hub":
        if not model.repo_id or not model.revision:
            raise TierquantError(
                "params: model.source is 'hub': set model.repo_id and model.revision "
                "(a commit sha, tag or branch)"
            )
        if not model.allow_patterns:
            raise TierquantError("params: model.allow_patterns must not be empty for a hub model")
    else:
        raise TierquantError(
            f"params: model.source must be 'synthetic' or 'hub', got {model.source!r}"
        )


def _check_recipe_and_tiers(config: Config, *, runnable: bool = True) -> None:
    """Type the recipe's rules, check their values, and parse every tier's precision."""
    if config.recipe.tiers:
        config.recipe.tiers = typed_rules(config.recipe.tiers)
    check_recipe(config.recipe)
    precisions = config.precisions()
    group_size = config.quant.group_size
    parse_candidates(config.measure.candidates, group_size, "measure.candidates")
    _check_range("measure.carry_layers", config.measure.carry_layers, 0)
    router_precision(config.budget.router, group_size)
    if config.recipe.allocate:
        check_auto_tiers(precisions)
        if runnable:
            check_budget(config.budget)
    elif runnable:
        _refuse_budget_without_allocation(config)


def _check_rounding(config: Config) -> None:
    """quant.rounding is one of ROUNDINGS, GPTQ can write every affine tier's bits, and
    the stage lists derived from it (quant.stages) are the ones for it: params.yaml
    edited by hand, or `python stages/x.py quant.rounding=...`, would otherwise run the
    other rounding's stages (or GPTQ without its calibration dependency)."""
    quant = config.quant
    if quant.rounding not in ROUNDINGS:
        raise TierquantError(
            f"params: quant.rounding must be one of {', '.join(ROUNDINGS)}, got {quant.rounding!r}"
        )
    if quant.rounding == "gptq":
        for tier, precision in config.precisions().items():
            if precision.mode == "affine" and precision.bits == 1:
                raise TierquantError(
                    f"params: quant.rounding is gptq but tiers.{tier} is 1 bit, which GPTQ "
                    "does not write (MLX's 1-bit affine rule is not reproduced); use rtn"
                )
    if config.measure.rounding not in ROUNDINGS:
        raise TierquantError(
            f"params: measure.rounding must be one of {', '.join(ROUNDINGS)}, "
            f"got {config.measure.rounding!r}"
        )
    if config.measure.rounding == "gptq" and quant.rounding != "gptq":
        # GPTQ damages would price bytes the rtn tiers never hold
        raise TierquantError(
            f"params: measure.rounding is gptq but quant.rounding is {quant.rounding!r}: "
            "measure scores the bytes the tiers will hold; set quant.rounding=gptq too, "
            "or measure.rounding=rtn"
        )
    expected = quant.by_rounding.get(quant.rounding)
    if quant.by_rounding and quant.stages != expected:
        raise TierquantError(
            f"params: quant.stages {dict(quant.stages)} is not what quant.rounding="
            f"{quant.rounding!r} derives ({expected}): recompose params.yaml "
            "(`python -m tierquant.config --write`, or `dvc exp run -S quant.rounding=...`)"
        )


def _refuse_budget_without_allocation(config: Config) -> None:
    """A budget is read only by recipe=auto: given with a hand recipe it would be
    silently ignored, so it is refused, naming the key."""
    b = config.budget
    given = [
        key
        for key, value in (
            ("budget.bits_per_weight", b.bits_per_weight),
            ("budget.gib", b.gib),
            ("budget.fit.memory_gib", b.fit.memory_gib),
            ("budget.fit.context", b.fit.context),
        )
        if value is not None
    ]
    if given:
        raise TierquantError(
            f"params: {given[0]} is set, but recipe {config.recipe.name!r} is a hand recipe "
            "(recipe.allocate is false), which ignores any budget; use `-S recipe=auto` to "
            f"allocate to a budget, or drop {given[0]}"
        )


def _check_range(
    key: str, value: float | None, low: float, high: float = float("inf"), *, open_low=False
) -> None:
    """A numeric param within [low, high] ((low, high] with open_low); None is allowed."""
    if value is None:
        return
    ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        upper = "" if high == float("inf") else f"{high:g}"
        raise TierquantError(
            f"params: {key} must be in {bracket}{low:g}, {upper or 'inf'}{']' if upper else ')'}"
            f", got {value}"
        )


def _check_validate(v: QualityGate) -> None:
    for key in ("kld_mean_max", "kld_p99_max", "kld_max_max", "bpw_tolerance"):
        _check_range(f"validate.{key}", getattr(v, key), 0)
    _check_range("validate.top1_min", v.top1_min, 0, 1)
    _check_range("validate.ppl_ratio_max", v.ppl_ratio_max, 0, open_low=True)


def _check_model_sizes(model: ModelConfig) -> None:
    _check_range("model.max_shard_bytes", model.max_shard_bytes, 1)
    if model.synthetic is not None:
        for key, value in dataclasses.asdict(model.synthetic).items():
            if isinstance(value, int) and not isinstance(value, bool) and key != "seed":
                _check_range(f"model.synthetic.{key}", value, 1)


def _check_eval(ev: TextSet, section: str = "eval") -> None:
    if ev.source == "hub":
        if not ev.repo_id or not ev.files:
            raise TierquantError(
                f"params: {section}.source is 'hub': set {section}.repo_id and "
                f"{section}.files (a file or glob in the dataset repo)"
            )
    elif ev.source != "text":
        raise TierquantError(f"params: {section}.source must be 'text' or 'hub', got {ev.source!r}")
    for key in ("num_windows", "window_length", "batch_size", "top_k"):
        if hasattr(ev, key) and getattr(ev, key) < 1:
            raise TierquantError(f"params: {section}.{key} must be >= 1, got {getattr(ev, key)}")
    if ev.window_length < 2:
        raise TierquantError(
            f"params: {section}.window_length must be >= 2 (one prediction per token)"
        )


def _check_memory(m: MemoryModel) -> None:
    for key in ("gpu_fraction", "gpu_fraction_small"):
        if not 0 < getattr(m, key) <= 1:
            raise TierquantError(f"params: memory.{key} must be in (0, 1], got {getattr(m, key)}")
    for key in ("small_memory_gib", "os_reserve_gib", "overhead_gib"):
        _check_range(f"memory.{key}", getattr(m, key), 0)
    for size in m.memory_gib:
        _check_range("memory.memory_gib", size, 0, open_low=True)


def _check_benchmark(b: BenchmarkSettings) -> None:
    if not b.contexts or min(b.contexts) < 1:
        raise TierquantError(f"params: benchmark.contexts must be positive ints, got {b.contexts}")
    for key in ("generate_tokens", "trials", "prefill_step_size", "probe_mib"):
        if getattr(b, key) < 1:
            raise TierquantError(f"params: benchmark.{key} must be >= 1, got {getattr(b, key)}")
    if b.warmup < 0:
        raise TierquantError(f"params: benchmark.warmup must be >= 0, got {b.warmup}")
    for chip, gbps in b.chips.items():
        _check_range(f"benchmark.chips.{chip}", gbps, 0, open_low=True)


def compose(overrides: list[str] | None = None) -> dict[str, Any]:
    """Compose conf/config.yaml with Hydra, as `dvc exp run` does, into a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides or [])
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_dict(config: Any) -> dict[str, Any]:
    """A typed config as plain data (every schema field present): the `params` that
    tierquant.report.provenance takes."""
    return dataclasses.asdict(config)


def compose_defaults(overrides: list[str] | None = None) -> dict[str, Any]:
    """The typed composition of `conf/` (+ overrides) as plain data, also from inside a
    running Hydra app (a stage): Hydra's global state is set aside and restored after."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        return config_dict(validate(compose(overrides), runnable=False))
    finally:
        restore_gh_from_backup(backup)


def params_text(params: dict[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(params))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tierquant.config",
        description="Compose conf/ into params.yaml (what `dvc exp run` does) or check it.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite params.yaml")
    mode.add_argument("--check", action="store_true", help="fail if params.yaml has drifted")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=wide")
    args = parser.parse_args(argv)
    params = compose(args.overrides)
    params_path = project_root() / "params.yaml"
    validate(params)
    text = params_text(params)
    if args.write:
        params_path.write_text(text)
        print(f"wrote {params_path}")
        return 0
    current = params_path.read_text() if params_path.exists() else ""
    if OmegaConf.to_container(OmegaConf.create(current)) != params:
        print(
            "params.yaml differs from the composition of conf/: run "
            "`python -m tierquant.config --write`",
            file=sys.stderr,
        )
        return 1
    print("params.yaml matches conf/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
