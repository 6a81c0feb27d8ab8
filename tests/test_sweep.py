"""The documented Pareto sweep (docs/sweep.md), end to end on the tiny model: `tierquant
sweep run` queues a budget and a hand recipe (two experiments, ~1 min each here; the
baseline is a third point), runs and waits, writes the charts, the
table and the dvc plots, each point named by what it changed; the card after `dvc exp
apply <name> && dvc repro card` shows the curve. And a failed experiment's exit."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import PYTHON, copy_repo, run

pytestmark = pytest.mark.slow

# tests/test_faults.py's FAST_PARAMS, in conf/ (`dvc exp run` recomposes params.yaml
# from it): the benchmark at one short context, 4 eval windows, a small calibration set.
FAST_CONF = {
    "conf/model_benchmark/tiny.yaml": {
        r"contexts:\n(  - \d+\n)+": "contexts:\n  - 16\n",
        r"generate_tokens: \d+": "generate_tokens: 4",
        r"trials: \d+": "trials: 1",
        r"warmup: \d+": "warmup: 0",
        r"probe_mib: \d+": "probe_mib: 8",
    },
    "conf/quality/tiny.yaml": {
        r"num_windows: 16": "num_windows: 4",
        r"calibration:\n  num_windows: \d+\n  window_length: \d+": (
            "calibration:\n  num_windows: 2\n  window_length: 32"
        ),
    },
}
GIT = ["git", "-c", "user.name=tierquant", "-c", "user.email=tierquant@localhost"]
SWEEP = [PYTHON, "-m", "tierquant.cli", "sweep", "run", "--poll", "2"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A repo copy with the fast settings committed, after `dvc repro` (the baseline the
    queued experiments start from, its outputs in the cache)."""
    repo = copy_repo(tmp_path_factory.mktemp("sweep") / "repo")
    for rel, subs in FAST_CONF.items():
        text = (repo / rel).read_text()
        for pattern, repl in subs.items():
            text, n = re.subn(pattern, repl, text, count=1)
            assert n == 1, (rel, pattern)
        (repo / rel).write_text(text)
    env = _env(repo)
    run([PYTHON, "-m", "tierquant.config", "--write"], repo, env)
    run(["dvc", "repro"], repo, env)
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-qm", "fast settings, reproduced"], repo)
    return repo


def _env(repo):
    # the stage scripts of this copy import its tierquant (not an installed one)
    return {"PYTHONPATH": str(repo)}


def test_sweep_run_charts_table_and_card_after_exp_apply(repo):
    proc = run([*SWEEP, "--budgets", "3.3", "--recipes", "mixed_3_6"], repo, _env(repo))
    out = proc.stdout
    assert out.count("sweep: queued ") == 2, out
    assert re.search(r"\] 0/2 done \(0 failed\); running: auto 3.3 bpw \(\S+\)", out), out
    assert "2/2 done (0 failed); running: none" in out, out
    sweep = repo / "sweep"
    for png in ("kld.png", "top1.png"):
        data = (sweep / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    assert (sweep / "plots" / "index.html").is_file()
    # every point named by what it changed; DVC's names only in the experiment column
    points = json.loads((sweep / "points.json").read_text())
    names = {p["name"]: p["experiment"] for p in points}
    assert set(names) == {"auto 3.3 bpw", "mixed_3_6", "seed"}, points
    table = (sweep / "table.md").read_text()
    for name, experiment in names.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"`{experiment}`" in row
    assert table in out  # the table is printed too
    # the gathered sweep is git-ignored: `dvc exp apply` leaves it, the card reruns with it
    assert run(["git", "status", "--porcelain", "sweep"], repo).stdout == ""
    run(["dvc", "exp", "apply", names["auto 3.3 bpw"]], repo, _env(repo))
    assert json.loads((sweep / "points.json").read_text()) == points
    card_run = run(["dvc", "repro", "card"], repo, _env(repo))
    assert "Running stage 'card'" in card_run.stdout
    card = (repo / "data" / "card" / "README.md").read_text()
    curve = card[card.index("## On the size/quality curve") :]
    curve = curve[: curve.index("\n## ")]
    assert "| **auto 3.3 bpw (this)** |" in curve, curve
    for name in ("mixed_3_6", "seed"):
        assert f"| {name} |" in curve, curve
    assert not any(experiment in curve for experiment in names.values())
    assert (
        "](curve.png)" in curve and (repo / "data" / "card" / "curve.png").stat().st_size > 10_000
    )


def test_a_failed_experiment_is_an_error(repo):
    """1.2 bits per weight is a valid param but below the smallest candidates' size: the
    experiment's check stage refuses it, and the sweep says so and exits 1."""
    proc = run([*SWEEP, "--budgets", "1.2", "--recipes"], repo, _env(repo), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and re.search(r"experiment \S+ \(auto 1.2 bpw\) failed: error: ", errors[0])
    assert "dvc queue logs" in errors[0] and "1 of 1 experiments failed" in errors[-1], errors
