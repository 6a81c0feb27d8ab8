"""End to end: real `dvc` commands on a throwaway copy of the repo."""

from __future__ import annotations

import pytest

from tests.conftest import copy_repo, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A repo copy after one full `dvc repro`."""
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    proc = run(["dvc", "repro"], repo)
    return repo, proc


def _ran(output: str) -> set[str]:
    """Stages that `dvc repro`/`dvc exp run` actually executed."""
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }


def test_repro_produces_a_verified_original(reproduced):
    from tierquant.gptoss import verify_original

    repo, proc = reproduced
    assert "download" in _ran(proc.stdout)
    verify_original(repo / "data" / "original")
    assert not (repo / "outputs").exists()
    assert not list(repo.glob("*.log"))


def test_second_repro_reruns_nothing(reproduced):
    repo, _ = reproduced
    before = {p.name: p.stat().st_mtime_ns for p in (repo / "data" / "original").iterdir()}
    proc = run(["dvc", "repro"], repo)
    assert _ran(proc.stdout) == set()
    after = {p.name: p.stat().st_mtime_ns for p in (repo / "data" / "original").iterdir()}
    assert after == before


def test_dvc_status_is_clean(reproduced):
    repo, _ = reproduced
    proc = run(["dvc", "status"], repo)
    assert "up to date" in proc.stdout.lower()
