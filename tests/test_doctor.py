"""tierquant.check.doctor's repair of a dvc.lock cut by an interrupt, on a repo copy (no
pipeline run): wherever DVC's in-place write stops, the repaired lock parses, DVC reads
it, and each stage's entry is whole (the cut one taken from git's dvc.lock).
tests/test_nothing_lost.py interrupts real runs."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.conftest import REPO, copy_repo, run
from tests.faults import dvc_env
from tierquant.check.doctor import doctor


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy with this checkout's dvc.lock committed, as a clone has it."""
    repo = copy_repo(tmp_path_factory.mktemp("doctor") / "repo")
    shutil.copyfile(REPO / "dvc.lock", repo / "dvc.lock")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    run([*git, "add", "dvc.lock"], repo)
    run([*git, "commit", "-qm", "lock"], repo)
    return repo


# Where the write stopped, as a fraction of the file: empty, mid-line, just after a
# newline, one byte short of the end.
CUTS = [0.0, 0.37, "line 0.6", -1]


@pytest.mark.parametrize("cut", CUTS, ids=["empty", "mid-line", "at-a-newline", "last-byte"])
def test_a_cut_lock_is_repaired_and_dvc_reads_it(repo, cut):
    lock = repo / "dvc.lock"
    whole = lock.read_bytes()
    if cut == -1:
        data = whole[:-1]
    elif isinstance(cut, str):
        at = int(len(whole) * float(cut.split()[1]))
        data = whole[: whole.index(b"\n", at) + 1]
    else:
        data = whole[: int(len(whole) * cut)]
    lock.write_bytes(data)
    try:
        report = doctor(repo, verify_cache=False)
        assert any(r.startswith("dvc.lock") for r in report.repairs), report.repairs
        fixed = yaml.safe_load(lock.read_text())["stages"]
        assert fixed == yaml.safe_load(whole)["stages"]  # here git's lock is the whole one
        run(["dvc", "status"], repo, env=dvc_env())  # DVC reads it
        assert not doctor(repo, verify_cache=False).repairs  # and a second pass finds nothing
    finally:
        lock.write_bytes(whole)


def test_a_whole_lock_is_left_alone(repo):
    before = (repo / "dvc.lock").read_bytes()
    report = doctor(repo, verify_cache=False)
    assert not report.repairs
    assert (repo / "dvc.lock").read_bytes() == before
