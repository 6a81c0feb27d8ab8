"""A local stand-in for the Hugging Face Hub, for tests.

`LocalHub` serves the subset of the Hub HTTP API that `huggingface_hub.snapshot_download`
(2.4.0) uses, from in-memory state, so tests can drive the real client with `endpoint=` or
`HF_ENDPOINT`. Plain HTTP only: nothing advertises Xet (no `X-Xet-*` headers, no `xetHash`
in tree entries), so the client takes its regular HTTP download path.

State model:

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

Write API (what `HfApi.create_repo`, `upload_folder` / `create_commit`, `create_tag`,
`create_branch`, `create_pull_request` and `list_repo_refs` call):

- `POST /api/repos/create`: a new repo gets an initial commit holding `.gitattributes`, as
  on the Hub; 409 if it exists (`exist_ok=True` accepts that).
- `POST /api/validate-yaml`: README.md front matter must parse as a YAML mapping (400 else).
- `POST /api/{kind}/{repo}/preupload/{rev}`: per file `uploadMode` (`lfs` by name pattern
  or size, see `is_lfs`; never xet), `shouldIgnore` false, and `oid` of the file already at
  `rev` (git blob sha1, or sha256 for LFS files) so the client drops unchanged files.
- `POST /{repo}.git/info/lfs/objects/batch`: the git-lfs batch API, `basic` transfer only
  (no `chunk_size`: single PUT; no xet). Objects already stored get no `actions`. Uploads go
  to `PUT /lfs-upload/{oid}?sig=...` (a presigned-style URL: no Authorization needed), then
  `POST /lfs-verify/{oid}`. `hub.lfs_objects` holds the uploaded bytes by sha256.
- `POST /api/{kind}/{repo}/commit/{rev}[?create_pr=1]`: the ndjson body of `_send_commit`
  (`header`, `file` base64, `lfsFile` (must be uploaded first, else 422), `deletedFile`,
  `deletedFolder`); `parentCommit` must be the branch head (412 else). `rev` is a branch or
  `refs/pr/N`; with `create_pr=1` a new PR `refs/pr/N` starts from `rev` and takes the
  commit. Answers `commitOid`, `commitUrl`, `pullRequestUrl`.
- `POST /api/{kind}/{repo}/discussions` (`pullRequest: true` makes `refs/pr/N` at the head
  of main) and `GET .../discussions/{num}`: `create_pull_request`.
- `POST /api/{kind}/{repo}/tag/{rev}` (409 if the tag exists), `POST .../branch/{name}`
  (409 if it exists), `GET .../refs`.

`hub.commits_log` lists `(repo_id, ref, sha, {path: "file"|"lfsFile"|"deleted"})` for every
commit made over HTTP: which files a commit carried. `hub.fail(method, path_regex,
status, times)` injects errors (e.g. a 500 on the commit endpoint mid-upload).

Errors carry the `X-Error-Code` header the client maps to typed exceptions: `RepoNotFound`
(`RepositoryNotFoundError`), `RevisionNotFound` (`RevisionNotFoundError`), `EntryNotFound`
(`RemoteEntryNotFoundError`).

Run `python tests/hubserver.py DIR REPO_ID` to serve a folder as one commit on `main`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import re
import secrets
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
    branches: dict[str, str] = field(default_factory=dict)  # also `refs/pr/N` of PRs
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, dict[str, Any]] = field(default_factory=dict)  # num -> title, base, ...

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


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int | None


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
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes uploaded through LFS
        self.commits_log: list[tuple[str, str, str, dict[str, str]]] = []
        self.faults: list[_Fault] = []
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

    def fail(self, method: str, path_regex: str, status: int = 500, times: int | None = 1) -> None:
        """Answer `status` to the next `times` (None: every) `method` requests whose path
        (unquoted, no query) matches `path_regex`."""
        with self.lock:
            self.faults.append(_Fault(method, re.compile(path_regex), status, times))

    def _take_fault(self, method: str, path: str) -> int | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and fault.pattern.search(path) and fault.times != 0:
                    if fault.times is not None:
                        fault.times -= 1
                    return fault.status
        return None

    def gitattributes(self) -> bytes:
        """The `.gitattributes` a new Hub repo starts with (its LFS name patterns)."""
        lines = [f"{p} filter=lfs diff=lfs merge=lfs -text" for p in self.lfs_patterns]
        return ("\n".join(lines) + "\n").encode()

    def commit_on(
        self,
        repo: Repo,
        ref: str,
        changes: Mapping[str, bytes | None],
        lfs_paths: Iterable[str],
        message: str,
    ) -> str:
        """Apply `changes` (path -> bytes, None deletes) on top of `ref`'s head; return the sha."""
        with self.lock:
            parent_sha = repo.branches.get(ref)
            parent = repo.commits[parent_sha] if parent_sha else None
            files = dict(parent.files) if parent else {}
            lfs = set(parent.lfs) if parent else set()
            for path, data in changes.items():
                if data is None:
                    files.pop(path, None)
                    lfs.discard(path)
                else:
                    files[path] = data
                    lfs.discard(path)
            lfs.update(p for p in lfs_paths if p in files)
            sha = _commit_sha(parent_sha, message, files, lfs)
            repo.commits[sha] = Commit(
                sha=sha,
                parent=parent_sha,
                message=message,
                files=MappingProxyType(files),
                lfs=frozenset(lfs),
            )
            repo.branches[ref] = sha
            return sha

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
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^{_API}/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^{_API}/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^{_API}/{_REPO}/tag/(?P<rev>[^/]+)$"), "create_tag"),
    ("POST", re.compile(rf"^{_API}/{_REPO}/branch/(?P<branch>[^/]+)$"), "create_branch"),
    ("GET", re.compile(rf"^{_API}/{_REPO}/refs$"), "refs"),
    ("POST", re.compile(rf"^{_API}/{_REPO}/discussions$"), "create_discussion"),
    ("GET", re.compile(rf"^{_API}/{_REPO}/discussions/(?P<num>\d+)$"), "discussion"),
    ("POST", re.compile(rf"{_FILE}{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
    ("POST", re.compile(r"^/lfs-verify/(?P<oid>[0-9a-f]{64})$"), "lfs_verify"),
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
        self.body = self._read_body()
        try:
            status = self.hub._take_fault(method, unquote(split.path))
            if status is not None:
                raise HubError(status, f"injected failure: {method} {split.path}")
            if not split.path.startswith("/lfs-upload/"):  # presigned: no Authorization
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

    def _read_body(self) -> bytes:
        """The request body: Content-Length or chunked transfer encoding."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as e:
            raise HubError(400, f"invalid JSON body: {e}") from None

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

    # -- write API ------------------------------------------------------------------------------

    def _url(self, repo: Repo) -> str:
        prefix = "datasets/" if repo.repo_type == "dataset" else ""
        return f"{self.hub.endpoint}/{prefix}{repo.repo_id}"

    def _create_repo(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        """`HfApi.create_repo`: a new repo with an initial `.gitattributes` commit."""
        body = self._json_body()
        name, org = body.get("name"), body.get("organization")
        repo_id = f"{org}/{name}" if org else name
        repo_type = body.get("type") or "model"
        store = self.hub._store(repo_type)
        with self.hub.lock:
            if repo_id in store:
                message = "You already created this model repo"
                response = _Response.json({"error": message, "url": self._url(store[repo_id])}, 409)
                response.headers["X-Error-Message"] = message
                return response
            repo = self.hub.create_repo(
                repo_id, private=body.get("visibility") == "private", repo_type=repo_type
            )
            self.hub.commit_on(
                repo, "main", {".gitattributes": self.hub.gitattributes()}, (), "initial commit"
            )
        return _Response.json({"url": self._url(repo), "name": repo_id, "id": repo_id})

    def _validate_yaml(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        """README.md metadata: the front matter must be a YAML mapping."""
        import yaml

        content = self._json_body().get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        errors = []
        if m is not None:
            try:
                meta = yaml.safe_load(m.group(1))
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        if errors:
            return _Response.json({"errors": errors, "warnings": []}, 400)
        return _Response.json({"errors": [], "warnings": []})

    def _preupload(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        """Upload mode per file (lfs/regular, never xet) and the oid already at `rev`."""
        with self.hub.lock:
            repo = self.hub._repo(params["repo"], _repo_type(params))
            commit = repo.resolve(params["rev"])
            if commit is None and repo.commits:
                raise HubError(404, f"Invalid rev id: {params['rev']}", "RevisionNotFound")
        files = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item["size"])
            entry: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if self.hub.is_lfs(path, size) else "regular",
                "shouldIgnore": False,
            }
            if commit is not None and path in commit.files:
                data = commit.files[path]
                lfs = path in commit.lfs
                entry["oid"] = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
            files.append(entry)
        return _Response.json({"files": files, "commitOid": commit.sha if commit else None})

    def _lfs_batch(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        """git-lfs batch API, `basic` transfer: upload + verify actions for missing objects."""
        body = self._json_body()
        with self.hub.lock:
            self.hub._repo(params["repo"], _repo_type(params))
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "only the basic upload transfer is supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:
                sig = secrets.token_hex(8)
                item["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/lfs-upload/{oid}?sig={sig}"},
                    "verify": {"href": f"{self.hub.endpoint}/lfs-verify/{oid}"},
                }
            objects.append(item)
        response = _Response.json({"transfer": "basic", "objects": objects})
        response.headers["Content-Type"] = "application/vnd.git-lfs+json"
        return response

    def _lfs_upload(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        """The PUT to the presigned URL: the bytes must hash to the oid."""
        oid = params["oid"]
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"uploaded bytes do not match sha256 {oid}")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = self.body
        return _Response(200, b"", {"ETag": f'"{oid[:32]}"'})

    def _lfs_verify(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        body = self._json_body()
        data = self.hub.lfs_objects.get(params["oid"])
        if data is None or len(data) != int(body.get("size", -1)):
            raise HubError(404, f"LFS object {params['oid']} not found")
        return _Response.json({"success": True})

    def _commit(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        """The ndjson commit: header, file (base64), lfsFile, deletedFile, deletedFolder."""
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        summary = header.get("summary") or ""
        if not summary:
            raise HubError(400, "commit summary is empty")
        message = summary + (f"\n\n{header['description']}" if header.get("description") else "")
        changes: dict[str, bytes | None] = {}
        kinds: dict[str, str] = {}
        lfs_paths: list[str] = []
        with self.hub.lock:
            repo = self.hub._repo(params["repo"], _repo_type(params))
            ref = params["rev"]
            create_pr = query.get("create_pr") in ("1", "true")
            if ref not in repo.branches:
                raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
            head = repo.commits[repo.branches[ref]]
            parent = header.get("parentCommit")
            if parent is not None and not create_pr and not head.sha.startswith(parent):
                raise HubError(412, f"parent commit {parent} is not the head of {ref}")
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"{path}: only base64 content is supported")
                    changes[path] = base64.b64decode(value["content"])
                    kinds[path] = "file"
                elif key == "lfsFile":
                    data = self.hub.lfs_objects.get(value.get("oid", ""))
                    if data is None:
                        oid = value.get("oid")
                        raise HubError(422, f"{path}: LFS object {oid} was not uploaded")
                    changes[path] = data
                    kinds[path] = "lfsFile"
                    lfs_paths.append(path)
                elif key == "deletedFile":
                    if path not in head.files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}")
                    changes[path] = None
                    kinds[path] = "deleted"
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in head.files:
                        if p.startswith(prefix):
                            changes[p] = None
                            kinds[p] = "deleted"
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            pr_url = None
            if create_pr:
                num = self._open_pr(repo, summary, base=ref)
                ref = f"refs/pr/{num}"
                pr_url = f"{self._url(repo)}/discussions/{num}"
            sha = self.hub.commit_on(repo, ref, changes, lfs_paths, message)
            self.hub.commits_log.append((repo.repo_id, ref, sha, kinds))
        return _Response.json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._url(repo)}/commit/{sha}",
                "pullRequestUrl": pr_url,
            }
        )

    def _open_pr(self, repo: Repo, title: str, base: str = "main") -> int:
        """A new PR: `refs/pr/N` starts at the head of `base`."""
        num = max([*repo.prs, 0]) + 1
        repo.prs[num] = {"title": title, "base": base, "status": "open"}
        repo.branches[f"refs/pr/{num}"] = repo.branches[base]
        return num

    def _create_discussion(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        body = self._json_body()
        if not body.get("pullRequest"):
            raise HubError(400, "LocalHub only supports pull requests as discussions")
        with self.hub.lock:
            repo = self.hub._repo(params["repo"], _repo_type(params))
            num = self._open_pr(repo, body.get("title", ""))
        return _Response.json({"num": num, "pullRequest": True, "url": f"{self._url(repo)}"})

    def _discussion(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        with self.hub.lock:
            repo = self.hub._repo(params["repo"], _repo_type(params))
            pr = repo.prs.get(int(params["num"]))
            if pr is None:
                raise HubError(404, f"Discussion {params['num']} not found")
        created = "2025-01-01T00:00:00.000Z"
        return _Response.json(
            {
                "title": pr["title"],
                "num": int(params["num"]),
                "author": {"name": "tester"},
                "createdAt": created,
                "status": pr["status"],
                "repo": {"name": repo.repo_id, "type": repo.repo_type},
                "isPullRequest": True,
                "events": [],
                "changes": {"base": f"refs/heads/{pr['base']}"},
                "filesWithConflicts": [],
            }
        )

    def _create_tag(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        tag = self._json_body().get("tag")
        with self.hub.lock:
            repo, commit = self.hub._commit(params["repo"], params["rev"], _repo_type(params))
            if not tag:
                raise HubError(400, "tag name missing")
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = commit.sha
        return _Response.json({"success": True})

    def _create_branch(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        body = self._json_body()
        with self.hub.lock:
            repo = self.hub._repo(params["repo"], _repo_type(params))
            branch = params["branch"]
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch} already exists")
            start = repo.resolve(body.get("startingPoint") or "main")
            if start is None:
                raise HubError(404, "Invalid starting point", "RevisionNotFound")
            repo.branches[branch] = start.sha
        return _Response.json({"success": True})

    def _refs(self, params: dict[str, str], query: dict[str, str]) -> _Response:
        with self.hub.lock:
            repo = self.hub._repo(params["repo"], _repo_type(params))

            def ref(name: str, full: str, sha: str) -> dict[str, str]:
                return {"name": name, "ref": full, "targetCommit": sha}

            branches = [
                ref(b, f"refs/heads/{b}", sha)
                for b, sha in repo.branches.items()
                if not b.startswith("refs/pr/")
            ]
            prs = [ref(b, b, sha) for b, sha in repo.branches.items() if b.startswith("refs/pr/")]
            tags = [ref(t, f"refs/tags/{t}", sha) for t, sha in repo.tags.items()]
        return _Response.json(
            {"branches": branches, "converts": [], "tags": tags, "pullRequests": prs}
        )


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
