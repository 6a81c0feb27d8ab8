"""The documented `recipe=auto` experiments (README.md and docs/), as a newcomer runs them
after a default `dvc repro`: each passes the gate, `tierquant compare` names them, and the
first one's DVC warnings. On a repo copy of its own, so it runs beside
tests/test_experiments.py (the hand recipes' experiments) on the other xdist worker."""

from __future__ import annotations

import json

import pytest

from tests.conftest import PYTHON, run
from tests.test_experiments import (
    NOISE,
    _documented_exp_runs,
    allocating,
    compare_rows,
    repro_copy,
    run_documented,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """One repo copy after `dvc repro`; the tests below run in order on it."""
    return repro_copy(tmp_path_factory)


def test_every_documented_allocating_exp_run_passes(repo):
    auto = [cmd for cmd in _documented_exp_runs() if allocating(cmd)]
    assert len(auto) >= 3 and all("recipe=auto" in cmd for cmd in auto)
    run_documented(repo, auto)


# The documented recipe=auto experiments (test above), as `tierquant compare` names them.
COMPARE_NAMES = ("auto 4.0 bpw", "auto 40 GiB", "auto fit 64 GiB@32768", "auto 4.0 bpw router=8")


def test_compare_names_each_experiment_at_120_columns(repo):
    lines, names = compare_rows(repo)
    assert set(COMPARE_NAMES) <= set(names), "\n".join(lines)
    csv = run([PYTHON, "-m", "tierquant.cli", "compare", "--csv", "--wide"], repo).stdout
    assert csv.splitlines()[0].endswith(",tiers,budget") and "auto fit 64 GiB@32768," in csv


@pytest.mark.xfail(
    strict=True,
    reason="DVC 3.67's `dvc exp run` starts with a checkout of every output "
    "(repo/experiments/executor/base.py, allow_missing=True), and dvc_data warns for each "
    "output dvc.lock has no hash for: the quantize@<tier> stages a new recipe defines "
    "(recipe=auto's 8 tiers after a hand recipe). Harmless; nothing in dvc.yaml or the "
    "config turns it off.",
)
def test_a_new_recipe_s_first_experiment_prints_no_hash_warnings(repo):
    logs = json.loads((repo.parent / "exp_runs.json").read_text())
    first_auto = next(log for cmd, log in logs.items() if "recipe=auto" in cmd)
    assert NOISE[1] not in first_auto
