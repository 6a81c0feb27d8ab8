"""The check stage's library function (tierquant.check.preflight), in-process: each
refusal names its key; a passing check writes the same stamp bytes every time. The same
cases through `dvc exp run` (nothing removed) are in tests/test_nothing_lost.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tierquant.check.preflight import STAMP, ModelSource, preflight
from tierquant.config import compose, validate
from tierquant.errors import TierquantError


def _check(tmp_path: Path, *overrides: str) -> Path:
    config = validate(compose(list(overrides)))
    model = config.model
    out = tmp_path / "checked.txt"
    preflight(
        model=ModelSource(
            source=model.source,
            synthetic=model.synthetic,
            repo_id=model.repo_id,
            revision=model.revision,
            download_params=dataclasses.asdict(model),
            original=tmp_path / "no-original",
            lock=tmp_path / "no-dvc.lock",
        ),
        eval_set=config.eval,
        calibration=config.calibration,
        candidates=list(config.measure.candidates),
        tiers=config.precisions(),
        group_size=config.quant.group_size,
        allocate=config.recipe.allocate,
        budget=config.budget,
        memory=config.memory,
        out=out,
    )
    return out


def test_the_defaults_pass_and_the_stamp_never_changes(tmp_path):
    out = _check(tmp_path)
    assert out.read_bytes() == STAMP
    before = out.stat().st_mtime_ns
    _check(tmp_path, "recipe=auto", "budget.bits_per_weight=3.5")
    assert out.read_bytes() == STAMP and out.stat().st_mtime_ns == before  # not rewritten


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["model.synthetic.intermediate_size=96"], "quant.group_size=64 does not divide"),
        (["recipe=auto", "budget.bits_per_weight=2.0"], "budget.bits_per_weight=2.0: infeasible"),
        (["recipe=auto", "budget.gib=0.0001"], "budget.gib=0.0001: infeasible"),
        (["recipe=auto", "budget.bits_per_weight=16", "measure.candidates=[2,3]"], "largest"),
        (["eval.num_windows=100000"], "eval.num_windows"),
        (["eval.path=/nonexistent.txt"], "eval.path"),
        (["calibration.path=/nonexistent.txt"], "calibration.path"),
        (["calibration.num_windows=1000"], "calibration.num_windows"),
    ],
)
def test_refusals_name_the_key(tmp_path, overrides, named):
    with pytest.raises(TierquantError) as e:
        _check(tmp_path, *overrides)
    assert named in str(e.value)
    assert not (tmp_path / "checked.txt").exists()


def test_an_empty_eval_text_is_too_short(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TierquantError, match="eval.num_windows") as e:
        _check(tmp_path, f"eval.path={empty}")
    assert "has 0" in str(e.value)
