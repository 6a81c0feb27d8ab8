"""The preflight check: everything about a run that can be checked cheaply, checked
before DVC removes any stage's output (the `check` stage, first in dvc.yaml).

DVC deletes a stage's outputs just before it runs the stage, so a stage that refuses
its params or inputs has already lost its previous output. The `check` stage runs
before every other stage (download and machine, the roots, depend on its output, so
everything else does through them) and depends on every param: a `dvc exp run -S ...`
that the pipeline would refuse stops there, with one `error:` line naming the key,
and every output as it was. It checks:

- every param's type and range (tierquant.config.validate, at load, as every stage);
- the model it will run on, without its weights: config.json and the tokenizer files.
  For `model.source: synthetic` they are derived from `model.synthetic` (the exact
  bytes the download stage writes: the tokenizer is trained on the bundled corpus in
  a fraction of a second); for a Hub model they are `paths.original`'s when dvc.lock
  says the download there was of the same `model.*` params, else fetched alone from
  the Hub (a few MB, even at 120B). Never the previous `data/original` of another
  model: it is read, but not declared as a dep (download depends on the check, so the
  check cannot depend on download's output);
- `quant.group_size` against the input width of every matrix an affine candidate or
  tier quantizes (config.json's sizes);
- for `recipe.allocate` (recipe=auto): the budget's feasibility, from the shapes and
  the candidates' sizes: the smallest candidates must fit `budget.*`, the largest must
  reach a bits-per-weight budget's tolerance band (tierquant.plan.autoplan's sizes);
- the eval and calibration texts exist and, tokenized with the model's tokenizer, are
  long enough for their windows (calibration's between the eval windows when both read
  the same text), exactly as reference and measure cut them.

The output is a stamp whose bytes never change (STAMP): a passing check reruns nothing
downstream. It is `persist: true` in dvc.yaml, so a failing check does not lose it
either (dvc.lock keeps its entry; nothing downstream sees a change).

What only shows mid-run (a bad tensor, a full disk, the quality gate) is not checked
here; RELIABILITY.md says what each of those leaves.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tierquant.core.files import atomic_output, read_json
from tierquant.core.gptoss import GptOssShape
from tierquant.core.precision import Precision, parse_candidates
from tierquant.errors import TierquantError
from tierquant.plan.autoplan import fixed_and_total
from tierquant.plan.autotiers import router_precision
from tierquant.plan.budget import BudgetRequest, resolve_budget
from tierquant.plan.footprint import MemoryModel
from tierquant.quality.calibration import calibration_token_windows, same_text
from tierquant.quality.damage import allocation_groups
from tierquant.quality.evalset import CalibrationSet, EvalSet, TextSet, load_eval_text, tokenize
from tierquant.source.synthetic import SyntheticSpec

log = logging.getLogger(__name__)

STAMP = b"tierquant check: params and inputs checked before any output is removed\n"
DOWNLOAD_PARAMS = ("source", "repo_id", "revision", "allow_patterns", "synthetic")


@dataclass(frozen=True)
class ModelSource:
    """Where the run's original comes from (params `model.*`), and where it lands."""

    source: str
    synthetic: SyntheticSpec | None
    repo_id: str | None
    revision: str | None
    download_params: dict[str, Any]  # every `model.*` param, as dvc.lock records them
    original: Path  # paths.original
    lock: Path  # dvc.lock, which says what data/original was downloaded with


def preflight(
    *,
    model: ModelSource,
    eval_set: EvalSet,
    calibration: CalibrationSet,
    candidates: list[Any],
    tiers: dict[str, Precision],
    group_size: int,
    allocate: bool,
    budget: BudgetRequest,
    memory: MemoryModel,
    out: Path,
) -> None:
    """Check what the module docstring lists; write the stamp `out`. Raises
    TierquantError (one line naming the key) on the first problem."""
    _check_text_files(eval_set, "eval")
    _check_text_files(calibration, "calibration")
    with tempfile.TemporaryDirectory(prefix="tierquant-check-") as tmp:
        model_dir = _model_side_files(model, scratch=Path(tmp))
        if model_dir is None:
            log.warning(
                "check: no config.json/tokenizer of %s@%s at hand (Hub unreachable): "
                "the group-size, budget and text-length checks are left to the stages",
                model.repo_id,
                model.revision,
            )
        else:
            config = read_json(model_dir / "config.json")
            shape = GptOssShape.from_config(config, f"{model_dir.name}/config.json")
            precisions = parse_candidates(candidates, group_size)
            _check_widths(shape, precisions, tiers)
            if allocate:
                _check_budget_fits(
                    shape,
                    budget,
                    memory,
                    precisions,
                    group_size,
                    int(config.get("max_position_embeddings", 0) or 0),
                )
            _check_windows(eval_set, calibration, model_dir)
    _write_stamp(Path(out))


def _write_stamp(out: Path) -> None:
    """The stamp, rewritten only when its bytes differ (they never do once written)."""
    if out.is_file() and out.read_bytes() == STAMP:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, is_dir=False) as tmp:
        tmp.write_bytes(STAMP)


def _check_text_files(ts: TextSet, section: str) -> None:
    if ts.source == "text" and ts.path is not None and not Path(ts.path).is_file():
        raise TierquantError(f"params: {section}.path: {ts.path} is not a file")


# --- the model, without its weights -----------------------------------------------------


def _model_side_files(model: ModelSource, scratch: Path) -> Path | None:
    """A folder holding the config.json and tokenizer files of the original the run will
    have; None when they cannot be had cheaply (a Hub model, offline, not downloaded)."""
    if model.source == "synthetic":
        assert model.synthetic is not None  # tierquant.config checks it
        return _synthetic_side_files(model.synthetic, scratch)
    original = model.original
    if (original / "config.json").is_file() and _downloaded_with(model.lock, model.download_params):
        return original
    return _hub_side_files(model.repo_id, model.revision, scratch)


def _synthetic_side_files(spec: SyntheticSpec, dest: Path) -> Path:
    """config.json and the tokenizer files the download stage writes for `spec`."""
    from tierquant.core.files import write_json
    from tierquant.quality.evalset import load_corpus
    from tierquant.source.synthetic import config_json
    from tierquant.source.tokenizer import build_tokenizer_files

    if spec.vocab_size < spec.num_regular_tokens + 21:
        raise TierquantError(
            f"params: model.synthetic.vocab_size ({spec.vocab_size}) must be at least "
            f"num_regular_tokens + 21 special tokens ({spec.num_regular_tokens + 21})"
        )
    for name, data in build_tokenizer_files(spec.num_regular_tokens, load_corpus()).items():
        (dest / name).write_bytes(data)
    write_json(dest / "config.json", config_json(spec))
    return dest


def _downloaded_with(lock: Path, params: dict[str, Any]) -> bool:
    """Whether dvc.lock's download entry was run with these `model.*` params."""
    try:
        entry = yaml.safe_load(lock.read_text())["stages"]["download"]
        locked = entry["params"]["params.yaml"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False
    return all(locked.get(f"model.{k}") == params.get(k) for k in DOWNLOAD_PARAMS)


def _hub_side_files(repo_id: str | None, revision: str | None, dest: Path) -> Path | None:
    from huggingface_hub import hf_hub_download

    from tierquant.core.gptoss import SIDE_FILES

    try:
        for name in ("config.json", *[f for f in SIDE_FILES if f.startswith("tokenizer")]):
            hf_hub_download(repo_id, name, revision=revision, local_dir=dest)  # type: ignore[arg-type]
    except Exception as e:  # offline, unreachable, gated: the download stage will say
        log.warning("check: cannot fetch %s@%s's config/tokenizer: %s", repo_id, revision, e)
        return None
    return dest


# --- the checks ---------------------------------------------------------------------------


def _check_widths(shape: GptOssShape, candidates: list[Precision], tiers: dict[str, Precision]):
    """quant.group_size divides the input width of every matrix the measure stage scores
    at an affine candidate (every allocated matrix) and an affine tier could hold."""
    group_sizes = {p.group_size for p in [*candidates, *tiers.values()] if p.mode == "affine"}
    if not group_sizes:
        return
    (group,) = group_sizes  # every affine precision is at quant.group_size
    groups, _ = allocation_groups(shape)
    for w in (w for g in groups for w in g.weights):
        if w.shape[-1] % group:  # type: ignore[operator]
            raise TierquantError(
                f"params: quant.group_size={group} does not divide the input width "
                f"{w.shape[-1]} of {w.name} (shape {list(w.shape)}, from config.json's "
                "sizes): measure and quantize would refuse it; use a group size that "
                "divides every matrix's last dimension"
            )


def _check_budget_fits(
    shape: GptOssShape,
    budget: BudgetRequest,
    memory: MemoryModel,
    candidates: list[Precision],
    group_size: int,
    max_positions: int,
) -> None:
    """The smallest candidates fit the budget; the largest reach its lower bound."""
    groups, fixed = allocation_groups(shape)
    router = router_precision(budget.router, group_size)
    fixed_bytes, total_params = fixed_and_total(groups, fixed, router)
    b = resolve_budget(
        budget, shape=shape, total_params=total_params, max_positions=max_positions, memory=memory
    )
    key = _budget_key(budget)
    smallest = fixed_bytes
    largest = fixed_bytes
    for g in groups:
        sizes = [g.nbytes(p) for p in candidates if g.allows(p)]
        if not sizes:
            raise TierquantError(
                f"params: measure.candidates: none applies to group {g.name} (mxfp4 is for "
                "expert groups only); add an affine candidate"
            )
        smallest += min(sizes)
        largest += max(sizes)
    if smallest > b.max_bytes:
        raise TierquantError(
            f"params: {key}: infeasible: it allows {b.max_bytes:,} bytes of weights, but "
            f"even the smallest candidates (measure.candidates) take {smallest:,} "
            f"({smallest * 8 / total_params:.3f} bits/weight); raise the budget or add "
            "smaller candidates"
        )
    if b.min_bytes is not None and largest < b.min_bytes:
        raise TierquantError(
            f"params: {key}: infeasible: the largest candidates (measure.candidates) take "
            f"{largest:,} bytes ({largest * 8 / total_params:.3f} bits/weight), below the "
            f"{b.min_bytes:,} its tolerance needs; lower it or add larger candidates"
        )


def _budget_key(budget: BudgetRequest) -> str:
    if budget.bits_per_weight is not None:
        return f"budget.bits_per_weight={budget.bits_per_weight}"
    if budget.gib is not None:
        return f"budget.gib={budget.gib}"
    return f"budget.fit.memory_gib={budget.fit.memory_gib}"


def _check_windows(eval_set: EvalSet, calibration: CalibrationSet, model_dir: Path) -> None:
    """Both texts, tokenized as reference and measure do, hold their windows."""
    eval_tokens = tokenize(load_eval_text(eval_set), model_dir)
    _enough(eval_tokens, eval_set, "eval")
    if same_text(calibration, eval_set):
        cal_tokens = eval_tokens
    else:
        cal_tokens = tokenize(load_eval_text(calibration), model_dir)  # type: ignore[arg-type]
        _enough(cal_tokens, calibration, "calibration")
    calibration_token_windows(
        cal_tokens, calibration, eval_set if same_text(calibration, eval_set) else None
    )


def _enough(tokens: list[int], ts: TextSet, section: str) -> None:
    need = ts.num_windows * ts.window_length
    if len(tokens) < need:
        where = ts.path or ts.files or "the bundled corpus"
        raise TierquantError(
            f"params: {section}.num_windows × {section}.window_length = {ts.num_windows} × "
            f"{ts.window_length} = {need} tokens, but the {section} text ({where}) has "
            f"{len(tokens)}; use fewer or shorter windows or a longer text"
        )
