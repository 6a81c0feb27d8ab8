"""End to end: real `dvc` commands on a throwaway copy of the repo."""

from __future__ import annotations

import json

import pytest

from tests.conftest import copy_repo, run, shrink_calibration

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A repo copy after one full `dvc repro`."""
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    shrink_calibration(repo)  # measure in seconds; tests/test_measure.py checks its numbers
    proc = run(["dvc", "repro"], repo)
    return repo, proc


ALWAYS_RUN = {"machine"}  # records the machine on every run; unchanged output stops there
# The check stage (tierquant.check.preflight) imports the budget, tokenizer and damage
# code to check a run before it starts: an edit there reruns it too, in seconds, and its
# stamp's bytes never change, so nothing downstream of it reruns for that.
CHECK = {"check"}


def _ran(output: str) -> set[str]:
    """Stages that `dvc repro`/`dvc exp run` actually executed."""
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }


def test_repro_produces_a_verified_original(reproduced):
    from tierquant.core.gptoss import verify_original

    repo, proc = reproduced
    assert "download" in _ran(proc.stdout)
    verify_original(repo / "data" / "original")
    assert not (repo / "outputs").exists()
    assert not list(repo.glob("*.log"))


def test_second_repro_reruns_nothing(reproduced):
    repo, _ = reproduced
    before = {p.name: p.stat().st_mtime_ns for p in (repo / "data" / "original").iterdir()}
    proc = run(["dvc", "repro"], repo)
    assert _ran(proc.stdout) - ALWAYS_RUN == set()
    after = {p.name: p.stat().st_mtime_ns for p in (repo / "data" / "original").iterdir()}
    assert after == before


def test_dvc_status_is_clean(reproduced):
    repo, _ = reproduced
    proc = run(["dvc", "status"], repo)
    changed = {line[:-1] for line in proc.stdout.splitlines() if line.endswith(":")}
    assert changed <= ALWAYS_RUN, proc.stdout


def _changed_stages(repo) -> set[str]:
    """The stages `dvc status` lists (its unindented lines; the indented ones are changes)."""
    out = run(["dvc", "status"], repo).stdout
    return {line[:-1] for line in out.splitlines() if line.endswith(":") and not line[:1].isspace()}


@pytest.mark.parametrize(
    "module, changed",
    [
        # the knapsack: stages/plan.py serves plan@rules and allocate@damage, so the seed
        # recipe's plan reruns (seconds, the same bytes); never measure
        ("tierquant/plan/allocate.py", {"plan@rules"}),
        ("tierquant/source/tokenizer.py", {"download"}),  # the tokenizer trainer
        ("tierquant/plan/handplan.py", {"plan@rules"}),  # a hand recipe's rules
    ],
)
def test_a_code_edit_invalidates_only_the_stages_that_run_it(reproduced, module, changed):
    """dvc.yaml's code deps are each stage's imports (tests/test_code_deps.py): an edit to
    one module changes the stages that import it, and DVC reruns from there. Against the
    workspace's status before the edit."""
    repo, _ = reproduced
    path = repo / module
    text = path.read_text()
    before = _changed_stages(repo)
    try:
        path.write_text(text + "\n# an edit\n")
        after = _changed_stages(repo)
    finally:
        path.write_text(text)
    assert after - before - ALWAYS_RUN - CHECK == changed, (before, after)


def test_the_seed_recipe_runs_no_measure_and_writes_no_float(reproduced):
    """Only a recipe that allocates measures (dvc.yaml's foreach over
    recipe.allocation), and the bf16 export is never part of the run."""
    repo, proc = reproduced
    ran = _ran(proc.stdout)
    assert not ran & {"measure@damage", "calibration@damage", "allocate@damage", "convert"}
    assert "plan@rules" in ran
    for absent in ("float", "measure", "calibration.npy"):
        assert not (repo / "data" / absent).exists(), absent


UPSTREAM = {"download", "plan@rules"}
OTHER_TIERS = {"quantize@control", "quantize@sensitive", "quantize@attention"}


def test_repro_builds_a_loadable_model(reproduced):
    from mlx_lm import load

    repo, proc = reproduced
    assert {"quantize@experts", "assemble"} <= _ran(proc.stdout)
    model, _ = load(str(repo / "data" / "model"))
    assert model.model.layers[0].mlp.experts.gate_proj.bits == 3


def _files(receipt: dict) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in receipt["files"]}


def test_exp_run_experts_4_reruns_only_the_experts_tier_onward(reproduced):
    """Also: the card and the dry-run receipt follow the experiment, and the original's
    benchmark and the reference stay cached."""
    from huggingface_hub import ModelCard
    from mlx_lm import load

    repo, first = reproduced
    assert {"card", "publish"} <= _ran(first.stdout)
    card_path = repo / "data" / "card" / "README.md"
    base_card = card_path.read_text()
    base = json.loads((repo / "data" / "publish.json").read_text())
    assert base["status"] == "dry-run" and base["commit"] is None
    assert base["source"]["git_dirty"] is False  # the pipeline's own outputs do not count
    assert "Quality gate: passed" in base_card and "| experts | 3-bit g64 |" in base_card
    assert ModelCard.load(card_path).data.library_name == "mlx"

    proc = run(["dvc", "exp", "run", "-S", "tiers.experts=4"], repo)
    ran = _ran(proc.stdout)
    assert {"quantize@experts", "assemble", "validate", "benchmark@model", "card", "publish"} <= ran
    assert not ran & (UPSTREAM | OTHER_TIERS | {"reference", "benchmark@original"}), ran
    model, _ = load(str(repo / "data" / "model"))
    assert model.model.layers[0].mlp.experts.gate_proj.bits == 4

    card = card_path.read_text()
    assert "| experts | 4-bit g64 |" in card and "| `tiers.experts` | `4` | `3` |" in card
    assert "dvc exp run -S tiers.experts=4" in card
    receipt = json.loads((repo / "data" / "publish.json").read_text())
    assert receipt["status"] == "dry-run"
    changed = {p for p, h in _files(receipt).items() if _files(base).get(p) != h}
    assert {"README.md", "config.json"} <= changed and "tokenizer.json" not in changed
    assert receipt["source"]["params_hash"] != base["source"]["params_hash"]


def test_exp_run_attention_6_reruns_only_the_attention_tier_onward(reproduced):
    repo, _ = reproduced
    proc = run(["dvc", "exp", "run", "-S", "tiers.attention=6", "assemble"], repo)
    ran = _ran(proc.stdout)
    assert {"quantize@attention", "assemble"} <= ran
    # experts goes back to 3 bits (Hydra recomposes conf/): restored from the run-cache.
    assert not ran & (UPSTREAM | {"quantize@control", "quantize@sensitive", "quantize@experts"})
