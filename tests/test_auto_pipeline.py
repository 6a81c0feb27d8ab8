"""recipe=auto under DVC: a budget change reruns plan and only the precision tiers whose
tensors moved, never measure or reference (a real `dvc exp run`); an eval change that keeps
the calibration windows never reruns measure."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import copy_repo, run, shrink_calibration
from tests.test_pipeline import _ran

pytestmark = pytest.mark.slow


def _plan_hashes(repo) -> dict[str, str]:
    return {
        p.stem: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((repo / "data" / "plan").glob("*.json"))
    }


def test_budget_change_reruns_only_plan_and_moved_tiers(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    shrink_calibration(repo)  # a small calibration set keeps the test lean

    targets = ["predict", "assemble", "reference"]  # not validate: the gate stops 3.3
    first = run(
        ["dvc", "exp", "run", "-S", "recipe=auto", "-S", "budget.bits_per_weight=4.0", *targets],
        repo,
    )
    assert {"measure@damage", "allocate@damage", "reference", "quantize@q3", "assemble"} <= _ran(
        first.stdout
    )
    before = _plan_hashes(repo)
    allocation = json.loads((repo / "data/plan/auto/allocation.json").read_text())
    assert 3.99 <= allocation["bits_per_weight"] <= 4.0
    predicted = json.loads((repo / "metrics/predicted_size.json").read_text())
    assert predicted["budget"]["slack_bytes"] >= 0
    size = json.loads((repo / "metrics/size.json").read_text())
    assert size["total"]["bytes"] == predicted["total"]["bytes"] == allocation["total_bytes"]

    second = run(
        ["dvc", "exp", "run", "-S", "recipe=auto", "-S", "budget.bits_per_weight=3.3", *targets],
        repo,
    )
    ran = _ran(second.stdout)
    after = _plan_hashes(repo)
    moved = {t for t in after if after[t] != before.get(t)}
    assert moved, "a lower budget must move some group to another precision"
    assert {"allocate@damage", "predict", "assemble"} <= ran
    assert "Stage 'reference' didn't change, skipping" in second.stdout
    assert not ran & {"download", "calibration@damage", "measure@damage", "reference"}, ran
    assert {s.split("@", 1)[1] for s in ran if s.startswith("quantize@")} == moved
    allocation = json.loads((repo / "data/plan/auto/allocation.json").read_text())
    assert 3.29 <= allocation["bits_per_weight"] <= 3.3

    # an edit of the knapsack changes the measured plan, never measure (its deps are its
    # imports: tests/test_code_deps.py)
    knapsack = repo / "tierquant" / "plan" / "allocate.py"
    knapsack.write_text(knapsack.read_text() + "\n# an edit\n")
    status = run(["dvc", "status"], repo).stdout
    changed = {line[:-1] for line in status.splitlines() if line.endswith(":")}
    assert "allocate@damage" in changed, status
    assert not changed & {"measure@damage", "calibration@damage", "reference"}, status


def test_an_eval_change_that_keeps_the_calibration_windows_reruns_no_measure(tmp_path):
    """measure depends on the calibration windows (data/calibration.npy), not on `eval`:
    with calibration on the bundled corpus and the eval set on another text, a change of
    the eval text reruns reference and the seconds-long calibration stage (same bytes),
    never measure."""
    from tierquant.quality.evalset import load_corpus

    repo = copy_repo(tmp_path / "repo")
    shrink_calibration(repo)
    corpus = load_corpus()
    texts = {"a": corpus[: len(corpus) // 2], "b": corpus[len(corpus) // 2 :]}
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
    base = ["-S", "recipe=auto", "-S", "budget.bits_per_weight=4.0"]
    targets = ["measure@damage", "reference"]
    first = run(["dvc", "exp", "run", *base, "-S", f"eval.path={tmp_path}/a.txt", *targets], repo)
    assert {"calibration@damage", "measure@damage", "reference"} <= _ran(first.stdout)
    windows = (repo / "data" / "calibration.npy").read_bytes()
    second = run(["dvc", "exp", "run", *base, "-S", f"eval.path={tmp_path}/b.txt", *targets], repo)
    ran = _ran(second.stdout)
    assert {"calibration@damage", "reference"} <= ran
    assert "measure@damage" not in ran, second.stdout
    assert (repo / "data" / "calibration.npy").read_bytes() == windows
