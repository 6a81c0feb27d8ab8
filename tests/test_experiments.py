"""A newcomer's session with DVC on one repo copy: the headline in `dvc exp show`, the
cache check repairing an in-place edit, every documented `dvc exp run` of a hand recipe
(README.md and docs/), failed experiments. The documented `recipe=auto` experiments run
in tests/test_experiments_auto.py, on a copy of their own (the two files run side by
side on pytest-xdist's two workers)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.conftest import PYTHON, copy_repo, fast_benchmark, run
from tests.docs import bash_blocks, doc_pages

pytestmark = pytest.mark.slow

HEADLINE = ("passed", "bpw", "GiB", "kld_mean", "top1", "gen_tok_s", "prefill_tok_s")
# Noise a normal run must not print: transformers' advice when mlx-lm imports it (no
# PyTorch here, none needed), and DVC's checkout of outputs it has no hash for.
NOISE = ("PyTorch was not found", "No file hash info found")


def repro_copy(tmp_path_factory) -> Path:
    """A repo copy (fast benchmark settings, tests/conftest.py) after `dvc repro`, its log
    beside it in repro.log."""
    repo = copy_repo(tmp_path_factory.mktemp("exp") / "repo")
    fast_benchmark(repo)
    proc = run(["dvc", "repro"], repo)
    (repo.parent / "repro.log").write_text(proc.stdout + proc.stderr)
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """One repo copy after `dvc repro`; the tests below run in order on it."""
    return repro_copy(tmp_path_factory)


def test_a_default_repro_prints_no_noise(repo):
    log = (repo.parent / "repro.log").read_text()
    assert "Running stage 'reference'" in log  # it imports mlx-lm, and so transformers
    for noise in NOISE:
        assert noise not in log, noise


def _headline(repo) -> dict:
    return json.loads((repo / "metrics" / "headline" / "quality.json").read_text())


@pytest.mark.parametrize(
    "cmd",
    [
        [PYTHON, "-m", "tierquant.cli", "compare", "--no-pager"],
        pytest.param(
            ["dvc", "exp", "show", "--no-pager"],
            marks=pytest.mark.xfail(
                strict=True,
                reason="plain dvc exp show lists every key of params.yaml (~100) and every "
                "dep (~50); rich's per-column separators alone exceed 160 columns, so it "
                "collapses even the metrics into '…' (tierquant compare keeps the headline)",
            ),
        ),
    ],
    ids=["tierquant-compare", "plain-dvc-exp-show"],
)
def test_exp_show_fits_the_headline_in_160_columns(repo, cmd):
    proc = run(cmd, repo, env={"COLUMNS": "160"})
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 160
    header = " ".join(lines[:4])
    for column in HEADLINE:
        assert re.search(rf"\b{column}\b", header), (column, proc.stdout)


def test_metrics_are_the_headline(repo):
    metrics = run(["dvc", "metrics", "show", "--json"], repo).stdout
    files = set(next(iter(json.loads(metrics).values()))["data"])
    assert files == {f"metrics/headline/{f}.json" for f in ("quality", "model", "original")}
    assert _headline(repo)["passed"] is True


def test_cache_verify_evicts_an_in_place_edit_and_repro_restores(repo):
    shard = sorted((repo / "data" / "model").glob("*.safetensors"))[0]
    good = shard.read_bytes()
    linked = shard.stat().st_nlink > 1  # hardlinked into the cache (.dvc/config)
    assert linked, "cache.type hardlink: an output and its cache object are one file"
    os.chmod(shard, 0o644)
    with open(shard, "r+b") as f:  # an in-place edit, as a careless tool would make
        f.seek(len(good) - 8)
        f.write(b"\xff" * 8)
    verify = run([PYTHON, "-m", "tierquant.cli", "cache", "verify"], repo, check=False)
    assert verify.returncode == 1, verify.stdout
    assert "evicted" in verify.stdout and shard.name in verify.stdout
    proc = run(["dvc", "repro"], repo)
    assert "Running stage 'assemble'" in proc.stdout
    assert shard.read_bytes() == good
    again = run([PYTHON, "-m", "tierquant.cli", "cache", "verify"], repo)
    assert "cache ok" in again.stdout


def _documented_exp_runs() -> list[list[str]]:
    """Every `dvc exp run` in the code blocks of README.md and docs/*.md that applies to
    the default model (not shell templates: lines with a `$` expansion, e.g. the Pareto
    sweep's loop), each once, in the order the pages give them."""
    commands = []
    for page in doc_pages():
        for block in bash_blocks(page.read_text()):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                literal = "&&" not in line and "$" not in line
                default_model = "model=" not in line
                cmd = line.split()[1:]
                if line.startswith("dvc exp run") and default_model and literal:
                    commands += [cmd] if cmd not in commands else []
    return commands


def allocating(cmd: list[str]) -> bool:
    """Whether a documented experiment allocates (recipe=auto: tests/test_experiments_auto.py)."""
    return "recipe=auto" in cmd


def run_documented(repo: Path, commands: list[list[str]]) -> None:
    """Run each `dvc exp run` as written; each must pass the gate, quietly. The logs go
    to exp_runs.json beside the repo."""
    logs = {}
    for cmd in commands:
        proc = run(["dvc", *cmd], repo, check=False)
        assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
        assert _headline(repo)["passed"] is True, cmd
        assert NOISE[0] not in proc.stdout + proc.stderr, cmd
        logs[" ".join(cmd)] = proc.stdout + proc.stderr
    (repo.parent / "exp_runs.json").write_text(json.dumps(logs))


def test_every_documented_hand_recipe_exp_run_passes(repo):
    commands = _documented_exp_runs()
    hand = [cmd for cmd in commands if not allocating(cmd)]
    assert ["exp", "run", "-S", "tiers.experts=4"] in hand and len(hand) >= 4
    assert len([cmd for cmd in commands if allocating(cmd)]) >= 3  # the other file's
    run_documented(repo, hand)


def compare_rows(repo: Path) -> tuple[list[str], list[str]]:
    """`tierquant compare` at 120 columns: its lines and each row's name, with the header
    and the last line (the original's figures) checked."""
    proc = run([PYTHON, "-m", "tierquant.cli", "compare"], repo, env={"COLUMNS": "120"})
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120, proc.stdout
    header = lines[0].split()
    for column in (*HEADLINE, "peak_memory_gib", "name", "experiment"):
        assert column in header, (column, lines[0])
    assert lines[-1].startswith("original (")
    return lines, [line.split("  ")[0].strip() for line in lines[1:-1]]


def test_compare_names_each_experiment_at_120_columns(repo):
    """The documented hand-recipe experiments (test above), as `tierquant compare` names
    them (the recipe=auto ones: tests/test_experiments_auto.py)."""
    lines, names = compare_rows(repo)
    assert {"experts=4", "experts=mxfp4", "mixed_3_6", "mixed_3_6 router=8"} <= set(names), (
        "\n".join(lines)
    )
    row = lines[1 + names.index("experts=4")].split()
    assert row[-2] == "yes" and all(re.fullmatch(r"[0-9.]+", v) for v in row[2:-2]), row
    csv = run([PYTHON, "-m", "tierquant.cli", "compare", "--csv", "--wide"], repo).stdout
    assert csv.splitlines()[0].endswith(",tiers,budget") and "\nexperts=4," in csv


def test_a_failed_experiment_leaves_nothing_that_lies(repo):
    run(["dvc", "exp", "run"], repo)  # back to the defaults: card + receipt for them
    proc = run(["dvc", "exp", "run", "-S", "tiers.experts=2"], repo, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: validate")]
    assert errors and len(errors) == len(set(errors))  # one line per problem, once
    assert "Traceback" not in proc.stderr
    headline = _headline(repo)
    assert headline["passed"] is False and headline["kld_mean"] > 0.065  # the tiny gate
    # the old card and receipt are still there, but publish refuses them
    dry = run([PYTHON, "stages/publish.py"], repo, check=False)
    assert dry.returncode == 1 and "made from another model" in dry.stderr, dry.stderr
    receipt = json.loads((repo / "data" / "publish.json").read_text())
    assert receipt["status"] == "failed"
    # an invalid value fails at load and deletes nothing
    bad = run(["dvc", "exp", "run", "-S", "tiers.experts=7"], repo, check=False)
    assert bad.returncode != 0 and "tiers.experts" in bad.stderr
    assert (repo / "metrics" / "predicted_size.json").is_file()
