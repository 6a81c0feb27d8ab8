"""A local stand-in for the Hugging Face Hub, for tests.

`LocalHub` serves the subset of the Hub HTTP API that `huggingface_hub.snapshot_download`
(2.4.0) uses, from in-memory state, so tests can drive the real client with `endpoint=` or
`HF_ENDPOINT`. Plain HTTP only: nothing advertises Xet (no `X-Xet-*` headers, no `xetHash`
in tree entries), so the client takes its regular HTTP download path.

State model (meant to grow into create_repo / preupload / commit / tags / PRs later):

- `hub.repos[repo_id]` (models) and `hub.datasets[repo_id]` (datasets: pass
  `repo_type="dataset"` to `create_repo` / `add_commit`) hold `Repo`s: `commits`
  (sha -> `Commit`), `branches` and `tags` (name -> commit sha).
- A `Commit` is a full snapshot: `files` maps repo path -> bytes; `lfs` names the paths stored
  as LFS objects (served with an LFS pointer oid, `X-Linked-Etag` = sha256, `X-Linked-Size`).
- Commit shas are deterministic (sha1 of tree, parent and message; no timestamps).

Endpoints (see `_ROUTES`):

- `GET /api/models/{repo_id}` and `GET /api/models/{repo_id}/revision/{revision}`:
  `HfApi.model_info` / `repo_info` (snapshot_download resolves a branch or tag with it).
- `GET /api/models/{repo_id}/tree/{revision}[/{path}]?recursive=...`: `HfApi.list_repo_tree`
  (snapshot_download lists the files of the resolved commit with it).
- The same under `/api/datasets/...` for dataset repos.
- `HEAD` / `GET /{repo_id}/resolve/{revision}/{path}` (`/datasets/{repo_id}/...` for
  datasets): `get_hf_file_metadata` and `http_get` inside `hf_hub_download`. Single
  `Range: bytes=a-b` requests get a 206.

Errors carry the `X-Error-Code` header the client maps to typed exceptions: `RepoNotFound`
(`RepositoryNotFoundError`), `RevisionNotFound` (`RevisionNotFoundError`), `EntryNotFound`
(`RemoteEntryNotFoundError`).

Run `python tests/hubserver.py DIR REPO_ID` to serve a folder as one commit on `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# Like the Hub's default .gitattributes: these names (and any file >= LFS_THRESHOLD) are LFS.
DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.gguf",
    "*.npz",
    "*.tar.gz",
    "*.zip",
)
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub's preupload switches to LFS at 10 MB

_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding `data` (what the Hub calls `oid` / `blobId`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file git stores in place of `data`."""
    sha256 = hashlib.sha256(data).hexdigest()
    return _LFS_POINTER.format(sha256=sha256, size=len(data)).encode()


@dataclass(frozen=True)
class Commit:
    """One commit: a full snapshot of the repo (path -> bytes), which paths are LFS, a parent."""

    sha: str
    parent: str | None
    message: str
    files: Mapping[str, bytes]
    lfs: frozenset[str] = frozenset()

    def entry(self, path: str) -> dict[str, Any]:
        """The tree-listing entry of a file, as the Hub's `/tree` endpoint returns it."""
        data = self.files[path]
        item: dict[str, Any] = {"type": "file", "path": path, "size": len(data)}
        if path in self.lfs:
            pointer = lfs_pointer(data)
            item["oid"] = git_blob_sha1(pointer)
            item["lfs"] = {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": len(pointer),
            }
        else:
            item["oid"] = git_blob_sha1(data)
        return item

    def etag(self, path: str) -> str:
        """The ETag the Hub sends for a file: git blob sha1, or sha256 for LFS files."""
        data = self.files[path]
        if path in self.lfs:
            return hashlib.sha256(data).hexdigest()
        return git_blob_sha1(data)

    def directories(self) -> set[str]:
        """Every folder that holds at least one file (not the root)."""
        dirs: set[str] = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return dirs


@dataclass
class Repo:
    """A repo: commits by sha, branches and tags naming commit shas."""

    repo_id: str
    repo_type: str = "model"
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch, tag, full sha or unique sha prefix (>= 7 chars) points to."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.tags:
            return self.commits[self.tags[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if len(revision) >= 7 and re.fullmatch(r"[0-9a-f]+", revision):
            matches = [sha for sha in self.commits if sha.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        return None


def _commit_sha(
    parent: str | None, message: str, files: Mapping[str, bytes], lfs: Iterable[str]
) -> str:
    """Deterministic commit id: depends on the parent, the message and the tree only."""
    lfs_set = set(lfs)
    h = hashlib.sha1()
    h.update(f"parent {parent or ''}\n{message}\n".encode())
    for path in sorted(files):
        kind = "lfs" if path in lfs_set else "blob"
        h.update(f"{kind} {git_blob_sha1(files[path])} {path}\n".encode())
    return h.hexdigest()


class HubError(Exception):
    """An error response: status, `X-Error-Code` and message (`X-Error-Message`, JSON body)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


class LocalHub:
    """An in-memory Hub served over HTTP on 127.0.0.1 (OS-chosen port) from a daemon thread.

    Use as a context manager (or `start()` / `stop()`); `endpoint` is the base URL. Set
    `require_token` to answer 401 to requests without `Authorization: Bearer <token>`.
    `requests` logs `(method, path)` of every request served (path without query string).
    """

    def __init__(
        self,
        *,
        require_token: str | None = None,
        lfs_patterns: Iterable[str] = DEFAULT_LFS_PATTERNS,
        lfs_threshold: int = LFS_THRESHOLD,
    ) -> None:
        self.require_token = require_token
        self.lfs_patterns = tuple(lfs_patterns)
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.datasets: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> LocalHub:
        """Start serving (idempotent)."""
        if self._server is None:
            handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            self._server.daemon_threads = True
            self._thread = threading.Thread(
                target=self._server.serve_forever, args=(0.05,), name="LocalHub", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:54321` (pass as `endpoint=` or `HF_ENDPOINT`)."""
        if self._server is None:
            raise RuntimeError("LocalHub is not running: use it as a context manager or start()")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- state (Python-side; HTTP write endpoints should go through these) ----------------------

    def _store(self, repo_type: str) -> dict[str, Repo]:
        """`repos` (models) or `datasets`."""
        if repo_type not in ("model", "dataset"):
            raise ValueError(f"unsupported repo_type {repo_type!r}")
        return self.repos if repo_type == "model" else self.datasets

    def create_repo(
        self,
        repo_id: str,
        *,
        private: bool = False,
        exist_ok: bool = True,
        repo_type: str = "model",
    ) -> Repo:
        """Create an empty repo (no commits, no branches) or return the existing one."""
        store = self._store(repo_type)
        with self.lock:
            if repo_id in store:
                if not exist_ok:
                    raise ValueError(f"repo {repo_id} exists")
                return store[repo_id]
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
            store[repo_id] = repo
            return repo

    def is_lfs(self, path: str, size: int) -> bool:
        """Whether a file is stored as LFS: name matches `lfs_patterns` or size >= threshold."""
        name = path.rsplit("/", 1)[-1]
        return size >= self.lfs_threshold or any(fnmatchcase(name, p) for p in self.lfs_patterns)

    def add_commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | Path,
        *,
        branch: str = "main",
        message: str = "Upload files",
        lfs: Iterable[str] | None = None,
        repo_type: str = "model",
    ) -> str:
        """Commit a full snapshot to `branch` (created if needed) and return the commit sha.

        `files` maps repo paths to bytes, or is a folder whose files (recursively) become the
        snapshot. The repo is created if missing. `lfs` overrides which paths are LFS (default:
        `is_lfs`). Same parent + message + files always gives the same sha.
        """
        snapshot = _read_folder(files) if isinstance(files, Path) else dict(files)
        for path in snapshot:
            if path.startswith("/") or "" in path.split("/") or ".." in path.split("/"):
                raise ValueError(f"bad repo path {path!r}")
        lfs_paths = (
            frozenset(lfs)
            if lfs is not None
            else frozenset(p for p, data in snapshot.items() if self.is_lfs(p, len(data)))
        )
        with self.lock:
            repo = self.create_repo(repo_id, repo_type=repo_type)
            parent = repo.branches.get(branch)
            sha = _commit_sha(parent, message, snapshot, lfs_paths)
            repo.commits[sha] = Commit(
                sha=sha,
                parent=parent,
                message=message,
                files=MappingProxyType(snapshot),
                lfs=lfs_paths,
            )
            repo.branches[branch] = sha
            return sha

    def add_tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        """Point `tag` at the commit `revision` resolves to; return that sha."""
        with self.lock:
            repo = self.repos[repo_id]
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(f"{repo_id}: unknown revision {revision!r}")
            repo.tags[tag] = commit.sha
            return commit.sha

    # -- lookups used by the handlers ---------------------------------------------------------

    def _repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        repo = self._store(repo_type).get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo_id: str, revision: str, repo_type: str = "model") -> tuple[Repo, Commit]:
        repo = self._repo(repo_id, repo_type)
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo, commit


def _read_folder(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        raise NotADirectoryError(folder)
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- HTTP ---------------------------------------------------------------------------------------

# Repo ids are `name` or `namespace/name`; revisions and tree paths arrive percent-encoded
# as one segment (`quote(rev, safe="")`); resolve paths keep their `/`.
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
# `kind` is `models` or `datasets` in API paths; resolve paths of datasets start `/datasets/`.
_API = r"/api/(?P<kind>models|datasets)"
_FILE = r"^/(?:(?P<kind>datasets)/)?"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(rf"^{_API}/{_REPO}/revision/(?P<rev>[^/]+)$"), "model_info"),
    ("GET", re.compile(rf"^{_API}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), "tree"),
    ("GET", re.compile(rf"^{_API}/{_REPO}$"), "model_info"),
    ("HEAD", re.compile(rf"{_FILE}{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"{_FILE}{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def _repo_type(params: Mapping[str, str]) -> str:
    """`model` or `dataset`, from a route's `kind` group."""
    return "dataset" if params.get("kind") == "datasets" else "model"


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200) -> _Response:
        body = json.dumps(payload).encode()
        return cls(status, body, {"Content-Type": "application/json; charset=utf-8"})


class _HubHandler(BaseHTTPRequestHandler):
    hub: LocalHub  # set on the subclass LocalHub.start() builds
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/0.1"
    timeout = 30  # drop idle keep-alive connections

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep test output clean; `hub.requests` has the log

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        with self.hub.lock:
            self.hub.requests.append((method, unquote(split.path)))
        try:
            self._check_auth()
            handler, params = self._route(method, split.path)
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            response = handler(params, query)
        except HubError as e:
            response = _Response.json({"error": e.message}, e.status)
            response.headers.update(e.headers)
            response.headers["X-Error-Message"] = e.message
            if e.code is not None:
                response.headers["X-Error-Code"] = e.code
        self._send(response, head=method == "HEAD")

    def _route(
        self, method: str, raw_path: str
    ) -> tuple[Callable[[dict[str, str], dict[str, str]], _Response], dict[str, str]]:
        path_matched = False
        for route_method, pattern, name in _ROUTES:
            m = pattern.match(raw_path)
            if m is None:
                continue
            path_matched = True
            if route_method == method:
                params = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                return getattr(self, f"_{name}"), params
        if path_matched:
            raise HubError(405, f"{method} not allowed on {raw_path}")
        raise HubError(404, f"No route for {method} {raw_path}")

    def _check_auth(self) -> None:
        token = self.hub.require_token
        if token is None:
            return
        auth = self.headers.get("Authorization")
        if auth is None:
            # What the Hub answers for private/gated repos without credentials.
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        if auth != f"Bearer {token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _send(self, response: _Response, *, head: bool) -> None:
        self.send_response(response.status)
        headers = {"Content-Length": str(len(response.body)), **response.headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and response.body:
            self.wfile.write(response.body)

    # -- endpoints ----------------------------------------------------------------------------

    def _model_info(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        """`HfApi.model_info`: `sha` and `siblings` are what download code reads."""
        with self.hub.lock:
            repo, commit = self.hub._commit(
                params["repo"], params.get("rev", "main"), _repo_type(params)
            )
        with_blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                entry = commit.entry(path)
                sibling["size"] = entry["size"]
                sibling["blobId"] = entry["oid"]
                if "lfs" in entry:
                    lfs = entry["lfs"]
                    sibling["lfs"] = {
                        "size": lfs["size"],
                        "sha256": lfs["oid"],
                        "pointerSize": lfs["pointerSize"],
                    }
            siblings.append(sibling)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        return _Response.json(
            {
                "_id": commit.sha[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": author,
                "sha": commit.sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _tree(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        """`HfApi.list_repo_tree`: files and folders under `path` (all levels if recursive)."""
        with self.hub.lock:
            _, commit = self.hub._commit(params["repo"], params["rev"], _repo_type(params))
        base = params.get("path", "").strip("/")
        recursive = query.get("recursive", "").lower() in ("1", "true")
        dirs = commit.directories()
        if base and base not in dirs:
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound")
        prefix = f"{base}/" if base else ""

        def wanted(path: str) -> bool:
            if not path.startswith(prefix):
                return False
            return recursive or "/" not in path[len(prefix) :]

        items: list[dict[str, Any]] = []
        for d in sorted(dirs):
            if wanted(d):
                inner = sorted(
                    (p, commit.entry(p)["oid"]) for p in commit.files if p.startswith(f"{d}/")
                )
                tree_oid = hashlib.sha1(json.dumps(inner).encode()).hexdigest()
                items.append({"type": "directory", "oid": tree_oid, "size": 0, "path": d})
        items.extend(commit.entry(p) for p in sorted(commit.files) if wanted(p))
        # One page only: the Hub paginates with a `Link: <...>; rel="next"` header at 1000 items.
        return _Response.json(items)

    def _resolve(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        """`HEAD`/`GET` of a file: the headers `get_hf_file_metadata` needs, the bytes."""
        with self.hub.lock:
            _, commit = self.hub._commit(params["repo"], params["rev"], _repo_type(params))
        path = params["path"]
        common = {"X-Repo-Commit": commit.sha}
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers=common)
        data = commit.files[path]
        etag = commit.etag(path)
        headers = {
            **common,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if path in commit.lfs:
            # The real Hub 302s LFS files to a CDN and puts the object's id and size here.
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        byte_range = self.headers.get("Range")
        if byte_range is None:
            return _Response(200, data, headers)
        start, end = _parse_range(byte_range, len(data))
        if start is None:
            headers["Content-Range"] = f"bytes */{len(data)}"
            return _Response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", headers)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _Response(206, data[start : end + 1], headers)


def _parse_range(header: str, size: int) -> tuple[int | None, int]:
    """Parse a single `bytes=a-b` / `bytes=a-` / `bytes=-n` range; (None, 0) if unsatisfiable."""
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if m is None or (not m.group(1) and not m.group(2)):
        return None, 0
    if not m.group(1):  # suffix range: last n bytes
        n = int(m.group(2))
        if n == 0:
            return None, 0
        return max(size - n, 0), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return None, 0
    return start, min(end, size - 1)


def main(argv: list[str] | None = None) -> None:
    """Serve a folder as `REPO_ID` (one commit on main) until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("repo_id")
    parser.add_argument("--token", help="require `Authorization: Bearer TOKEN`")
    args = parser.parse_args(argv)
    with LocalHub(require_token=args.token) as hub:
        sha = hub.add_commit(args.repo_id, args.folder, message=f"Add {args.folder}")
        print(f"serving {args.repo_id}@{sha} from {args.folder}")
        print(f"HF_ENDPOINT={hub.endpoint}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
