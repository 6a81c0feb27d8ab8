"""publish stage: data/model + the card → a Hub model repo, safe to run unattended.

Dry run by default (`publish.push: false`, and always inside `dvc exp run`): writes the
receipt `paths.publish` (data/publish.json) with the target repo and revision, the
commit message, and every file that would be uploaded (path, size, sha256), and the
digests of what it publishes (`source`: model files, validate's metrics); nothing touches
the network. Both the dry run and a push refuse a card whose `tierquant:` metadata names
another repo id, model digest or validate.json than the current ones (after a failed
experiment the workspace holds a new model beside the previous run's card).

With `publish.push=true` (`python stages/publish.py publish.push=true`, what the release
workflow runs) it first refuses, before any network access, when `HF_TOKEN` is unset
(huggingface_hub's stored login is deliberately not used, so automation never publishes
with a personal token by accident), when validation has not passed
(`paths.validate`'s `passed`), or when the card is missing. Then:

1. `create_repo(exist_ok=True, private=publish.private)`; a `publish.revision` other than
   main is created as a branch if missing.
2. The local files are compared with the remote tree (git blob sha1, or sha256 for LFS/xet
   files): if nothing differs, no commit (and no pull request) is made and the receipt
   says `unchanged` with the current head.
3. Otherwise `upload_folder` (huggingface_hub 2.x has no `upload_large_folder`) of a
   staging folder of symlinks (data/model's files + the card as README.md; nothing is
   copied), with a commit message naming the git revision and the params hash. The
   client itself skips unchanged files, so only changed files are sent; stale
   `*.safetensors` on the remote (an old shard layout) are deleted in the same commit,
   since mlx-lm loads every `model*.safetensors` it finds. `publish.create_pr` opens a
   pull request against main instead.
4. `publish.tag` tags the resulting commit (an existing tag on the same commit is fine;
   on another commit it is an error: tags are never moved).

The receipt is written atomically and only at the end: `pushed` or `unchanged` with the
commit (and PR URL) after success. Any failure (dry run or push) replaces it with a
receipt whose `status` is `failed` and whose `commit` is null, and the stage exits
non-zero, so no receipt ever claims a push that did not complete. The token never
appears in logs, errors or the receipt.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierquant.core.files import atomic_output, json_bytes, read_json
from tierquant.errors import TierquantError
from tierquant.report.provenance import (
    describe_revision,
    hash_file,
    model_files,
)
from tierquant.report.release import CARD_NAME, made_from

log = logging.getLogger(__name__)

RECEIPT_FORMAT = 1
TOKEN_ENV = "HF_TOKEN"
# Set by `dvc exp run` for the commands it runs: experiments never publish.
EXPERIMENT_ENV = "DVC_EXP_BASELINE_REV"
STALE_PATTERNS = ["*.safetensors"]  # remote files of these names not in data/model are deleted


@dataclass(frozen=True)
class LocalFile:
    """One file to upload: its repo path, where it is, size and content hashes."""

    path: str
    source: Path
    size: int
    sha256: str
    git_sha1: str

    def receipt(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def collect_files(model_dir: Path, card: Path) -> list[LocalFile]:
    """data/model's files (hidden ones skipped, any README.md replaced) + the card."""
    if not (model_dir / "config.json").is_file():
        raise TierquantError(f"{model_dir}: no model to publish (no config.json); run assemble")
    if not card.is_file():
        raise TierquantError(f"{card}: the model card is missing; run the card stage")
    sources = model_files(model_dir)
    # the card and the files it references (its charts) from the card's folder
    sources.update(model_files(card.parent))
    files = []
    for rel in sorted(sources):
        size, sha256, sha1 = hash_file(sources[rel])
        files.append(LocalFile(rel, sources[rel].resolve(), size, sha256, sha1))
    return files


def validation_status(path: Path) -> dict[str, Any]:
    """`{"path", "passed"}`: passed is None when validation has not run."""
    if not path.is_file():
        return {"path": str(path), "passed": None}
    return {"path": str(path), "passed": read_json(path).get("passed") is True}


@dataclass(frozen=True)
class Target:
    """Where and how to publish (params' `publish:`, with the repo id resolved)."""

    repo_id: str
    revision: str = "main"
    private: bool = False
    create_pr: bool = False
    tag: str | None = None
    push: bool = False


@dataclass(frozen=True)
class Build:
    """What is published: the run's files and what they were built from."""

    model_dir: Path
    card_dir: Path  # holds README.md (the card) and the files it references
    validate: Path  # validate's metrics: `passed` gates a push
    model_name: str
    recipe_name: str
    tiers: dict[str, Any]  # tier -> precision, as in params
    provenance: dict[str, Any]  # tierquant.report.provenance.build_provenance(...)


def commit_message(build: Build) -> tuple[str, str]:
    """(summary, description) of the Hub commit: names the git revision and params hash."""
    revision, phash = build.provenance["revision"], build.provenance["params_hash"]
    bits = "/".join(str(v) for v in build.tiers.values())
    summary = (
        f"tierquant {describe_revision(revision)}: {build.model_name} {build.recipe_name} "
        f"({bits}), params {phash}"
    )
    description = "\n".join(
        [
            f"git revision: {revision.get('commit') or 'unknown'}"
            + (" (uncommitted changes)" if revision.get("dirty") else ""),
            f"params hash: {phash}",
            "tiers: " + ", ".join(f"{k}={v}" for k, v in build.tiers.items()),
        ]
    )
    return summary, description


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _write_receipt(path: Path, receipt: dict[str, Any]) -> None:
    with atomic_output(path, is_dir=False) as tmp:
        tmp.write_bytes(json_bytes(receipt))


def publish(*, build: Build, target: Target, receipt_path: Path) -> dict[str, Any]:
    """The publish stage: a dry-run receipt, or (target.push) a push to the Hub."""
    out = Path(receipt_path)
    pub = target
    revision = build.provenance["revision"]
    phash = build.provenance["params_hash"]
    summary, description = commit_message(build)
    receipt: dict[str, Any] = {
        "format": RECEIPT_FORMAT,
        "status": "failed",
        "repo_id": target.repo_id,
        "repo_type": "model",
        "revision": pub.revision,
        "private": pub.private,
        "create_pr": pub.create_pr,
        "tag": pub.tag,
        "source": {
            "git_commit": revision["commit"],
            "git_dirty": revision["dirty"],
            "params_hash": phash,
        },
        "commit_message": summary,
        "validation": validation_status(build.validate),
        "files": [],
        "total_bytes": 0,
        "commit": None,
    }
    token = os.environ.get(TOKEN_ENV) or None
    try:
        card_path = Path(build.card_dir) / CARD_NAME
        model_dir = Path(build.model_dir)
        files = collect_files(model_dir, card_path)
        receipt["files"] = [f.receipt() for f in files]
        receipt["total_bytes"] = sum(f.size for f in files)
        model_hashes = {f.path: f.sha256 for f in files if f.path in model_files(model_dir)}
        receipt["source"]["repo_id"] = target.repo_id
        receipt["source"].update(made_from(model_dir, build.validate, model_hashes))
        if not pub.push:
            check_card_matches(card_path, receipt["source"], build.validate)
            receipt["status"] = "dry-run"
            if receipt["validation"]["passed"] is not True:
                log.warning("validation has not passed: a push of this model would be refused")
            _write_receipt(out, receipt)
            log.info(
                "dry run: %d files, %d bytes for %s@%s -> %s (publish.push=true to push)",
                len(files),
                receipt["total_bytes"],
                receipt["repo_id"],
                pub.revision,
                out,
            )
            return receipt
        _check_push(target, receipt, token)
        check_card_matches(card_path, receipt["source"], build.validate)
        result = push_to_hub(
            files,
            repo_id=receipt["repo_id"],
            token=token,  # type: ignore[arg-type]  # _check_push made sure
            revision=pub.revision,
            private=pub.private,
            create_pr=pub.create_pr,
            tag=pub.tag,
            summary=summary,
            description=description,
        )
        receipt.update(result)
    except Exception as e:
        message = _scrub(str(e) if isinstance(e, TierquantError) else _describe(e), token)
        receipt.update(status="failed", commit=None, error=message)
        _write_receipt(out, receipt)
        if isinstance(e, TierquantError):
            raise TierquantError(message) from None
        raise TierquantError(
            f"publish to {receipt['repo_id']} failed: {message}. Nothing is recorded as "
            "published; rerun to retry (files already uploaded are skipped)"
        ) from None
    _write_receipt(out, receipt)
    log.info("publish: %s %s@%s", receipt["status"], receipt["repo_id"], receipt["commit"]["oid"])
    return receipt


def card_build(card_path: Path) -> dict[str, Any]:
    """What the card says it was made from (its `tierquant:` metadata; {} if none)."""
    from huggingface_hub import ModelCard

    return dict(ModelCard.load(card_path).data.to_dict().get("tierquant") or {})


def check_card_matches(card_path: Path, source: dict[str, Any], validate_path: Path) -> None:
    """Refuse (dry run and push) a card made from another model or another validate.json:
    after a failed experiment the workspace holds a new model beside an old card."""
    recorded = card_build(card_path)
    if recorded.get("repo_id") != source.get("repo_id"):
        raise TierquantError(
            f"publish refused: {card_path} is written for {recorded.get('repo_id')!r}, not "
            f"{source.get('repo_id')!r} (its heading and usage snippet name the repo); "
            "rebuild it with the same publish.* settings: `python stages/card.py "
            "publish.namespace=...` (or set publish.namespace in conf/ and `dvc repro`)"
        )
    for key, what, path in (
        ("model_sha256", "model", "data/model"),
        ("validate_sha256", "validation metrics", str(validate_path)),
    ):
        if recorded.get(key) != source.get(key):
            raise TierquantError(
                f"publish refused: {card_path} was made from another {what} than the one in "
                f"{path} now (card: {recorded.get(key)}, now: {source.get(key)}), e.g. after "
                "a failed experiment; rebuild the card with `dvc repro` (or `python "
                "stages/card.py`) once validation has run"
            )


def _check_push(target: Target, receipt: dict[str, Any], token: str | None) -> None:
    """Refuse a push before any network access: experiment, token, repo id, validation."""
    if os.environ.get(EXPERIMENT_ENV):
        raise TierquantError(
            "publish.push=true inside `dvc exp run`: experiments never publish. Commit the "
            "result and run `python stages/publish.py publish.push=true`"
        )
    if not token:
        raise TierquantError(
            f"publish.push=true needs a Hub write token in {TOKEN_ENV}; it is not set (the "
            "token saved by `hf auth login` is not used for publishing)"
        )
    if "/" not in receipt["repo_id"]:
        raise TierquantError(
            f"publish: no Hub namespace for {receipt['repo_id']!r}: set publish.namespace "
            "(the Hub user or organization, e.g. publish.namespace=my-org) or publish.repo_id"
        )
    if target.create_pr and target.revision != "main":
        raise TierquantError(
            "publish.create_pr opens a pull request against main: leave publish.revision=main"
        )
    passed = receipt["validation"]["passed"]
    if passed is not True:
        why = "has not run" if passed is None else "failed"
        raise TierquantError(
            f"publish refused: validation {why} ({receipt['validation']['path']}); only a "
            "model that passed the quality gate is published"
        )


def _describe(e: BaseException) -> str:
    """An exception as one line: HTTP status + server message for Hub errors, the cause."""
    from huggingface_hub.errors import HfHubHTTPError

    while isinstance(e, RuntimeError) and e.__cause__ is not None and not str(e).strip():
        e = e.__cause__
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        detail = e.server_message or str(e).strip().splitlines()[0]
        return f"HTTP {status}: {detail}"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    cause = e.__cause__ or e.__context__
    if cause is not None and cause is not e:
        text = f"{text} ({_describe(cause)})" if text else _describe(cause)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def remote_files(api: Any, repo_id: str, revision: str) -> dict[str, tuple[str, int]]:
    """Remote path -> (content id, size): sha256 for LFS/xet files, else git blob sha1."""
    from huggingface_hub.errors import RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        entries = list(api.list_repo_tree(repo_id, revision=revision, recursive=True))
    except RevisionNotFoundError:
        return {}
    out = {}
    for entry in entries:
        if isinstance(entry, RepoFile):
            oid = entry.lfs.sha256 if entry.lfs is not None else entry.blob_id
            out[entry.path] = (oid, entry.size)
    return out


def _differs(local: LocalFile, remote: tuple[str, int] | None) -> bool:
    return remote is None or remote[0] not in (local.sha256, local.git_sha1)


def push_to_hub(
    files: list[LocalFile],
    *,
    repo_id: str,
    token: str,
    revision: str,
    private: bool,
    create_pr: bool,
    tag: str | None,
    summary: str,
    description: str,
) -> dict[str, Any]:
    """Create the repo, upload what changed in one `upload_folder`, tag; the receipt part."""
    from fnmatch import fnmatchcase

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    log.info("publish: repo %s", url)
    if revision != "main" and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    base = "main" if create_pr else revision
    remote = remote_files(api, repo_id, base)
    local_paths = {f.path for f in files}
    changed = [f.path for f in files if _differs(f, remote.get(f.path))]
    stale = sorted(
        p
        for p in remote
        if p not in local_paths and any(fnmatchcase(p, pat) for pat in STALE_PATTERNS)
    )
    result: dict[str, Any] = {"changed": changed, "deleted": stale}
    if not changed and not stale:
        head = api.repo_info(repo_id, revision=base, repo_type="model").sha
        log.info("publish: %s@%s already holds these files: no commit", repo_id, base)
        result.update(status="unchanged", commit={"oid": head, "url": None, "pr_url": None})
    else:
        log.info("publish: uploading %d changed files, deleting %d", len(changed), len(stale))
        with tempfile.TemporaryDirectory(prefix="tierquant-publish-") as staging:
            for f in files:
                link = Path(staging) / f.path
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f.source)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                commit_message=summary,
                commit_description=description,
                revision=None if create_pr else revision,
                create_pr=create_pr,
                delete_patterns=STALE_PATTERNS,
                repo_type="model",
            )
        result.update(
            status="pushed",
            commit={"oid": info.oid, "url": info.commit_url, "pr_url": info.pr_url},
        )
    if tag:
        _tag(api, repo_id, tag, result["commit"]["oid"])
    return result


def _tag(api: Any, repo_id: str, tag: str, oid: str) -> None:
    """Tag `oid`; an existing tag must already point there (tags are never moved)."""
    existing = {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}
    if tag in existing:
        if existing[tag] != oid:
            raise TierquantError(
                f"tag {tag!r} already exists in {repo_id} at {existing[tag]}, not at the "
                f"published commit {oid}; tags are never moved: use a new publish.tag"
            )
        return
    api.create_tag(repo_id, tag=tag, revision=oid, tag_message=f"tierquant release {tag}")
