"""Hugging Face Hub access: download a pinned snapshot of a model repo."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, get_cached_repo_tree, get_token, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tierquant.core.checkpoint import INDEX_NAME
from tierquant.core.gptoss import SIDE_FILES
from tierquant.errors import TierquantError

log = logging.getLogger(__name__)

# Matched against full repo paths with fnmatch, whose `*` also matches `/`: `*.safetensors`
# would pull openai/gpt-oss-*'s `original/*.safetensors` too, hence `model-*.safetensors`.
DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = (*SIDE_FILES, "model-*.safetensors", INDEX_NAME)

_CACHE_DIR = ".cache"  # snapshot_download(local_dir=...) metadata, holds timestamps


def download_snapshot(
    repo_id: str,
    revision: str,
    allow_patterns: Sequence[str],
    dest: Path,
    *,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Download the files of `repo_id` at `revision` matching `allow_patterns` into `dest`.

    `revision` (branch, tag or commit sha) is resolved to a commit sha first and every file
    is fetched at that sha, so a branch moving mid-download cannot mix two commits. The sha
    is returned.

    `allow_patterns` are fnmatch patterns matched on the full repo path, where `*` also
    matches `/`: `*.safetensors` would fetch gpt-oss's `original/*.safetensors` as well
    (another 65 GB), which is why `DEFAULT_ALLOW_PATTERNS` uses `model-*.safetensors`.

    `dest` must be an existing empty directory (the caller renames it into place); the
    client's `dest/.cache` metadata is removed afterwards so the folder hashes the same on
    every run. `token` defaults to the client's own lookup (`HF_TOKEN`, then the token saved
    by `hf auth login`); `endpoint` defaults to `HF_ENDPOINT` (read when huggingface_hub is
    imported) or https://huggingface.co.

    Raises `TierquantError` for a missing repo or revision, missing or rejected credentials,
    no matching file, or an unreachable Hub. After an error `dest` may hold partial files:
    discard it.
    """
    if isinstance(allow_patterns, str):
        raise TypeError("allow_patterns must be a sequence of patterns, not a string")
    patterns = list(allow_patterns)
    if not patterns:
        raise TierquantError(
            f"model.allow_patterns is empty: nothing to download from {repo_id}; list the repo "
            f"files to fetch, e.g. {list(DEFAULT_ALLOW_PATTERNS)}"
        )
    if not dest.is_dir() or any(dest.iterdir()):
        raise TierquantError(f"download destination {dest} must be an existing empty directory")

    where = (endpoint or constants.ENDPOINT).rstrip("/")
    what = f"{repo_id!r} at revision {revision!r} from {where}"
    try:
        try:
            info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision)
            if not info.sha:
                raise TierquantError(f"the Hub returned no commit sha for {what}")
            sha = info.sha
            log.info("downloading %s (commit %s), patterns %s", what, sha, patterns)
            snapshot_download(
                repo_id,
                revision=sha,
                allow_patterns=patterns,
                local_dir=dest,
                token=token,
                endpoint=endpoint,
            )
        except GatedRepoError as e:  # before RepositoryNotFoundError: it is a subclass
            raise TierquantError(
                f"{repo_id!r} is gated: accept its terms on the Hub with your account, then set "
                f"HF_TOKEN to a token of that account ({_http_detail(e)})"
            ) from e
        except RepositoryNotFoundError as e:
            if token or get_token():
                hint = "the token in use (HF_TOKEN or `hf auth login`) may have no access to it"
            else:
                hint = "no token was found: set HF_TOKEN"
            raise TierquantError(
                f"repository {repo_id!r} not found at {where}, or it is private/gated and {hint}. "
                f"Check model.repo_id in params ({_http_detail(e)})"
            ) from e
        except RevisionNotFoundError as e:
            raise TierquantError(
                f"revision {revision!r} not found in {repo_id!r} at {where}: check model.revision "
                f"in params (a branch, a tag or a full commit sha)"
            ) from e
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise TierquantError(
                    f"the Hub refused access to {what}: check that HF_TOKEN holds a valid token "
                    f"with read access ({_http_detail(e)})"
                ) from e
            raise TierquantError(
                f"the Hub failed while downloading {what}: {_http_detail(e)}; retry later"
            ) from e
        except (httpx2.TransportError, OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
            reason = str(e).rstrip(".")
            raise TierquantError(
                f"cannot reach the Hub to download {what}: {type(e).__name__}: {reason}. Check "
                f"the network and HF_ENDPOINT (HF_HUB_OFFLINE=1 forbids downloads)."
            ) from e

        files = [p for p in dest.iterdir() if p.name != _CACHE_DIR]
        if not files:
            raise TierquantError(
                f"no file of {repo_id!r} at commit {sha} matched model.allow_patterns {patterns} "
                f"(matched on full paths). Files in the repo: {_repo_files(repo_id, sha, dest)}"
            )
    finally:
        shutil.rmtree(dest / _CACHE_DIR, ignore_errors=True)
    return sha


def _http_detail(error: HfHubHTTPError) -> str:
    """Status code and the server's message, without the client's multi-line advice."""
    status = error.response.status_code if error.response is not None else "?"
    message = error.server_message or str(error).strip().splitlines()[0]
    return f"HTTP {status}: {message}"


def _repo_files(repo_id: str, sha: str, dest: Path, limit: int = 20) -> str:
    """Some of the repo's paths, from the tree listing snapshot_download cached in `dest`."""
    try:
        paths = sorted(f.path for f in get_cached_repo_tree(repo_id, revision=sha, local_dir=dest))
    except Exception:  # only decorates an error message
        return "(unknown)"
    if not paths:
        return "none (the repo is empty)"
    more = f", ... ({len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more
