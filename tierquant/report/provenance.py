"""Where a build came from: git revision, a hash of its params, and how to recreate it.

The model card's reproduction section and the publish commit message use these.
"Params that differ from defaults" compares the run's typed config with the
composition of `conf/` (a `defaults_of` function the caller passes), both normalized
through the same schema. The model and recipe config groups are compared as group choices
(`model=gpt-oss-120b`, `recipe=mixed_3_6`), so switching a recipe is one override rather
than every key of it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Keys that never change what is built: left out of the params hash and the command.
NOT_BUILD_PARAMS = ("publish",)
# Derived by interpolation in conf/config.yaml from quant.rounding: never an override.
DERIVED_PARAMS = ("quant.stages.", "quant.by_rounding.")


# What the pipeline itself rewrites while it runs: not "uncommitted changes" of the source.
PIPELINE_FILES = ("dvc.lock", "params.yaml")


def pipeline_outputs(paths: dict[str, str]) -> list[str]:
    """dvc.lock, params.yaml (its differences are reported as params), every output path
    in `paths` (params' `paths:`) and the `.gitignore` DVC writes beside each: what
    `dirty` ignores, so a build inside `dvc repro` is not dirty."""
    outputs = [str(p) for p in paths.values()]
    gitignores = {(Path(p).parent / ".gitignore").as_posix() for p in outputs}
    return [*PIPELINE_FILES, *outputs, *sorted(gitignores)]


def git_revision(root: Path, ignore: list[str] | tuple[str, ...] = ()) -> dict:
    """`{"commit": sha or None, "dirty": bool or None}` of the checkout at `root`.

    `dirty` counts tracked and untracked (non-ignored) changes, as `git status` does,
    outside the paths in `ignore`. Without git, or outside a repository, both are None.
    """

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


def params_hash(params: dict[str, Any]) -> str:
    """sha256 (first 16 hex digits) of the build params: everything but `publish`."""
    data = {k: v for k, v in params.items() if k not in NOT_BUILD_PARAMS}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _group_overrides(params: dict, defaults: dict, root: Path) -> list[str]:
    """`model=<name>` / `recipe=<name>` where the run picked another conf/ group file."""
    overrides = []
    for group in ("model", "recipe"):
        chosen, default = params[group]["name"], defaults[group]["name"]
        if chosen != default and (root / "conf" / group / f"{chosen}.yaml").is_file():
            overrides.append(f"{group}={chosen}")
    return overrides


Defaults = Callable[[list[str]], dict[str, Any]]
"""`defaults(overrides)`: the composition of `conf/` with Hydra `overrides`, as plain data
in the same form as the run's params (tierquant.config.compose_defaults)."""


def params_diff(params: dict[str, Any], defaults_of: Defaults, root: Path) -> dict[str, Any]:
    """How this run's params (every schema field, as plain data) differ from `conf/`'s
    (`defaults_of`; `root`: the checkout whose conf/ groups are looked up).

    Returns `{"groups": [...], "changed": [(key, value, default)], "overrides": [...]}`;
    `overrides` are the Hydra overrides that recreate the run (`groups` first).
    `publish.*` is left out: it never changes what is built.
    """
    defaults = defaults_of([])
    groups = _group_overrides(params, defaults, root)
    if groups:
        defaults = defaults_of(groups)
    ours = {k: v for k, v in _flatten(params).items() if _recreating(k)}
    theirs = {k: v for k, v in _flatten(defaults).items() if _recreating(k)}
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


def _recreating(key: str) -> bool:
    """Whether a flattened param key belongs in the overrides that recreate a run: not
    `publish.*`, and not the lists conf/config.yaml derives from quant.rounding
    (`quant.stages`, `quant.by_rounding`: `-S quant.rounding=...` recreates them)."""
    return key.split(".")[0] not in NOT_BUILD_PARAMS and not key.startswith(DERIVED_PARAMS)


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


def build_provenance(
    params: dict[str, Any], *, root: Path, defaults_of: Defaults | None = None
) -> dict[str, Any]:
    """Where a build came from, for the card and the publish receipt: `revision` (git
    commit + dirty of the checkout at `root`, the pipeline's own outputs ignored),
    `params_hash`, and (given `defaults_of`) `diff` = params_diff(params, ...)."""
    return {
        "revision": git_revision(root, ignore=pipeline_outputs(params["paths"])),
        "params_hash": params_hash(params),
        "diff": params_diff(params, defaults_of, root) if defaults_of else None,
    }


def repro_command(overrides: list[str]) -> str:
    """The `dvc exp run` that recreates a run from the defaults (plain `dvc repro` if none)."""
    if not overrides:
        return "dvc repro"
    quoted = " ".join(f"-S {shlex.quote(o)}" for o in overrides)
    return f"dvc exp run {quoted}"


# --- what a card / receipt was made from -------------------------------------------------

_CHUNK = 16 << 20
MODEL_DIGEST_EXCLUDE = ("README.md",)  # the card replaces any README when published


def hash_file(path: Path) -> tuple[int, str, str]:
    """(size, sha256, git blob sha1) in one streaming pass."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return size, sha256.hexdigest(), sha1.hexdigest()


def model_files(model_dir: Path) -> dict[str, Path]:
    """A model folder's files by relative path (hidden ones, e.g. DVC's, skipped)."""
    return {
        p.relative_to(model_dir).as_posix(): p
        for p in sorted(model_dir.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)
    }


def tree_digest(hashes: dict[str, str]) -> str:
    """sha256 over `path sha256` lines (sorted): one name for a folder's content."""
    lines = "".join(f"{path} {h}\n" for path, h in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def model_digest(model_dir: Path, hashes: dict[str, str] | None = None) -> str | None:
    """The digest of a model folder's files (README.md left out); None if it has none.

    `hashes` (path -> sha256), when the caller has hashed the files already, saves a pass.
    """
    if hashes is None:
        hashes = {rel: hash_file(p)[1] for rel, p in model_files(Path(model_dir)).items()}
    hashes = {k: v for k, v in hashes.items() if k not in MODEL_DIGEST_EXCLUDE}
    return tree_digest(hashes) if hashes else None


def file_sha256(path: Path) -> str | None:
    """sha256 of a file, None when it does not exist."""
    return hash_file(Path(path))[1] if Path(path).is_file() else None
