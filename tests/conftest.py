"""Shared fixtures: a tiny synthetic checkpoint, and throwaway copies of the repo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import copy_checkout
from tierquant.config import SyntheticSpec

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# The test files that take longest (minutes: each drives `dvc` through whole pipelines on a
# repo copy), longest first. They are handed to the two xdist workers first, so that the
# suite's wall time is not one long file started last (--no-loadscope-reorder).
LONGEST_FIRST = (
    "test_experiments_auto.py",
    "test_experiments.py",
    "test_remote.py",
    "test_nothing_lost.py",
    "test_auto_pipeline.py",
    "test_sweep.py",
    "test_faults.py",
    "test_pipeline.py",
    "test_gptq_pipeline.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def tiny_spec(**changes) -> SyntheticSpec:
    """The `tiny` model of conf/model/tiny.yaml, with changes."""
    from tierquant.config import compose

    synthetic = compose()["model"]["synthetic"]
    synthetic.update(changes)
    return SyntheticSpec(**synthetic)


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory) -> Path:
    """The RANDOM synthetic model at the tiny shape (`weights: random`, tierquant.source.synthetic;
    the default `tiny` is the trained one since #28: tests/test_trained.py), read-only:
    copy before changing. Tests calibrated on the random model's figures use it."""
    from tierquant.source.synthetic import write_synthetic_checkpoint

    out = tmp_path_factory.mktemp("tiny") / "original"
    out.mkdir()
    write_synthetic_checkpoint(out, tiny_spec(weights="random"))
    return out


@pytest.fixture(scope="session")
def tiny_float(tiny_original, tmp_path_factory) -> Path:
    """data/float of the tiny model (read-only)."""
    from tierquant.source.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("float") / "float"
    convert_checkpoint(tiny_original, out, max_shard_bytes=2_000_000)
    return out


def build_model(root: Path, original: Path, float_dir: Path, overrides: list[str] = ()):
    """plan → quantize every tier → assemble, in-process (the stage scripts' own code,
    tierquant.pipeline), every output under `root`; returns (config, model dir, size
    metrics)."""
    from tierquant.config import compose, validate
    from tierquant.core.files import read_json
    from tierquant.pipeline import paths_under, run_stages

    config = validate(compose(list(overrides)))
    config = paths_under(config, root, original=original)
    run_stages(config, ["plan", "quantize", "assemble"])
    return config, Path(config.paths.model), read_json(Path(config.paths.size_metrics))


@pytest.fixture(scope="session")
def models(tiny_original, tiny_float, tmp_path_factory):
    """models(*overrides) -> (config, model dir, plan dir) of the tiny model, built once
    per overrides (read-only: copy before changing); size metrics in model dir/../size.json."""
    built: dict[tuple[str, ...], tuple] = {}

    def get(*overrides: str):
        if overrides not in built:
            root = tmp_path_factory.mktemp("model")
            config, model_dir, _ = build_model(root, tiny_original, tiny_float, list(overrides))
            built[overrides] = (config, model_dir, root / "plan")
        return built[overrides]

    return get


def isolate_hf_client(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep huggingface_hub off ~/.cache/huggingface and away from any real token or
    endpoint. It reads its env vars once, at import, into `constants`: patch both."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name, value in {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
    }.items():
        monkeypatch.setattr(constants, name, value)
    return home


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True):
    """Run a command with the venv's tools first on PATH; return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env["PATH"] = str(Path(PYTHON).parent) + os.pathsep + full_env.get("PATH", "")
    full_env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    full_env.setdefault("DVC_NO_ANALYTICS", "1")
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
            f"--- stderr\n{proc.stderr}"
        )
    return proc


def run_stage(
    stage: str, *overrides: str, cwd: Path = REPO, env: dict | None = None, check: bool = False
):
    return run([PYTHON, f"stages/{stage}.py", *overrides], cwd=cwd, env=env, check=check)


def copy_repo(dest: Path) -> Path:
    """A fresh git repo holding the project's tracked and untracked (non-ignored) files."""
    return copy_checkout(dest)


def shrink_calibration(repo: Path, num_windows: int = 2, window_length: int = 32) -> None:
    """Make a repo copy's calibration set small (conf/ + params.yaml, committed), so its
    `measure` stage takes seconds; `dvc exp run -S` recomposes conf/ and keeps it."""
    conf = repo / "conf" / "quality" / "tiny.yaml"  # the tiny model's calibration set
    head, tail = conf.read_text().split("calibration:\n", 1)
    tail = re.sub(r"num_windows: \d+", f"num_windows: {num_windows}", tail, count=1)
    tail = re.sub(r"window_length: \d+", f"window_length: {window_length}", tail, count=1)
    conf.write_text(head + "calibration:\n" + tail)
    _commit_conf(repo, "small calibration set")


def fast_benchmark(repo: Path) -> None:
    """Make a repo copy's benchmark stage take a second instead of ~12 (one short context,
    one trial: the same code paths, the tok/s only noisier; conf/ + params.yaml,
    committed, so `dvc exp run -S` keeps it)."""
    (repo / "conf" / "model_benchmark" / "tiny.yaml").write_text(
        "# @package benchmark\ncontexts:\n  - 16\ngenerate_tokens: 4\ntrials: 1\n"
        "warmup: 0\nprobe_mib: 8\n"
    )
    _commit_conf(repo, "fast benchmark")


def _commit_conf(repo: Path, message: str) -> None:
    run([PYTHON, "-m", "tierquant.config", "--write"], repo)
    git = ["git", "-c", "user.name=tierquant", "-c", "user.email=tierquant@localhost"]
    run([*git, "commit", "-qam", message], repo)


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    return copy_repo(tmp_path / "repo")
