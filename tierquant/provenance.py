"""Where a build came from: git revision, a hash of its params, and how to recreate it.

The model card's reproduction section and the publish commit message use these.
"Params that differ from defaults" compares the run's typed config with the
composition of `conf/` (tierquant.config.compose), both normalized through the same
schema. The model and recipe config groups are compared as group choices
(`model=gpt-oss-120b`, `recipe=mixed_3_6`), so switching a recipe is one override rather
than every key of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from .config import Config, compose, project_root, validate

# Keys that never change what is built: left out of the params hash and the command.
NOT_BUILD_PARAMS = ("publish",)


# What the pipeline itself rewrites while it runs: not "uncommitted changes" of the source.
PIPELINE_FILES = ("dvc.lock", "params.yaml")


def pipeline_outputs(config: Config) -> list[str]:
    """dvc.lock, params.yaml (its differences are reported as params), every output path
    in `paths` and the `.gitignore` DVC writes beside each: what `dirty` ignores, so a
    build inside `dvc repro` is not dirty."""
    outputs = [str(p) for p in dataclasses.asdict(config.paths).values()]
    gitignores = {(Path(p).parent / ".gitignore").as_posix() for p in outputs}
    return [*PIPELINE_FILES, *outputs, *sorted(gitignores)]


def git_revision(root: Path | None = None, ignore: list[str] | tuple[str, ...] = ()) -> dict:
    """`{"commit": sha or None, "dirty": bool or None}` of the checkout at `root`.

    `dirty` counts tracked and untracked (non-ignored) changes, as `git status` does,
    outside the paths in `ignore`. Without git, or outside a repository, both are None.
    """
    root = root or project_root()

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    sha = git("rev-parse", "--verify", "HEAD")
    if sha is None:
        return {"commit": None, "dirty": None}
    excludes = [f":(exclude){p}" for p in ignore if p and not Path(p).is_absolute()]
    status = git("status", "--porcelain", "--", ".", *excludes)
    return {"commit": sha.strip(), "dirty": bool(status and status.strip())}


def describe_revision(rev: dict[str, Any]) -> str:
    """`abc1234`, `abc1234+dirty` or `unknown (no git)`."""
    if not rev.get("commit"):
        return "unknown (no git)"
    return rev["commit"][:12] + ("+dirty" if rev.get("dirty") else "")


def config_dict(config: Config) -> dict[str, Any]:
    """The typed config as plain data (every schema field present)."""
    return dataclasses.asdict(config)


def params_hash(config: Config) -> str:
    """sha256 (first 16 hex digits) of the build params: everything but `publish`."""
    data = {k: v for k, v in config_dict(config).items() if k not in NOT_BUILD_PARAMS}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def compose_defaults(overrides: list[str] | None = None) -> Config:
    """The typed composition of `conf/` (+ overrides), also from inside a running Hydra app
    (a stage): Hydra's global state is set aside while composing and restored after."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        return validate(compose(overrides))
    finally:
        restore_gh_from_backup(backup)


def _group_overrides(config: Config, defaults: Config, root: Path) -> list[str]:
    """`model=<name>` / `recipe=<name>` where the run picked another conf/ group file."""
    overrides = []
    for group, chosen, default in (
        ("model", config.model.name, defaults.model.name),
        ("recipe", config.recipe.name, defaults.recipe.name),
    ):
        if chosen != default and (root / "conf" / group / f"{chosen}.yaml").is_file():
            overrides.append(f"{group}={chosen}")
    return overrides


def params_diff(config: Config, root: Path | None = None) -> dict[str, Any]:
    """How this run's params differ from the defaults in `conf/`.

    Returns `{"groups": [...], "changed": [(key, value, default)], "overrides": [...]}`;
    `overrides` are the Hydra overrides that recreate the run (`groups` first).
    `publish.*` is left out: it never changes what is built.
    """
    root = root or project_root()
    defaults = compose_defaults()
    groups = _group_overrides(config, defaults, root)
    if groups:
        defaults = compose_defaults(groups)
    ours = {
        k: v
        for k, v in _flatten(config_dict(config)).items()
        if k.split(".")[0] not in NOT_BUILD_PARAMS
    }
    theirs = {
        k: v
        for k, v in _flatten(config_dict(defaults)).items()
        if k.split(".")[0] not in NOT_BUILD_PARAMS
    }
    changed = [(k, ours.get(k), theirs.get(k)) for k in sorted(set(ours) | set(theirs))]
    changed = [(k, v, d) for k, v, d in changed if v != d]
    overrides = list(groups)
    for key, value, _default in changed:
        if key not in ours:
            overrides.append(f"~{key}")
        elif key not in theirs:
            overrides.append(f"+{key}={override_value(value)}")
        else:
            overrides.append(f"{key}={override_value(value)}")
    return {"groups": groups, "changed": changed, "overrides": overrides}


_PLAIN = re.compile(r"[A-Za-z0-9_./:+-]+")


def override_value(value: Any) -> str:
    """A value in Hydra's override grammar: null, numbers, plain or quoted strings, lists."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.fullmatch(text) and text not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def repro_command(overrides: list[str]) -> str:
    """The `dvc exp run` that recreates a run from the defaults (plain `dvc repro` if none)."""
    if not overrides:
        return "dvc repro"
    quoted = " ".join(f"-S {_shell_quote(o)}" for o in overrides)
    return f"dvc exp run {quoted}"


def _shell_quote(text: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:=+,-]+", text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"
