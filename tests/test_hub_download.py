"""tierquant.source.hub.download_snapshot against a LocalHub, through the real
huggingface_hub client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from hubserver import LocalHub, git_blob_sha1
from huggingface_hub import get_hf_file_metadata, hf_hub_url

from tests.conftest import isolate_hf_client
from tierquant.errors import TierquantError
from tierquant.source.hub import DEFAULT_ALLOW_PATTERNS, download_snapshot

REPO = "openai/gpt-oss-fake"
PATTERNS = list(DEFAULT_ALLOW_PATTERNS)
ROOT = Path(__file__).resolve().parents[1]


def _blob(seed: int, size: int) -> bytes:
    return bytes((seed * 31 + i * 7) % 256 for i in range(size))


def _files(version: int) -> dict[str, bytes]:
    """A gpt-oss-shaped repo; `version` changes config.json and the first shard."""
    return {
        "config.json": json.dumps({"model_type": "gpt_oss", "version": version}).encode(),
        "generation_config.json": b'{"do_sample": true}',
        "model-00000-of-00001.safetensors": _blob(version, 3000),
        "model-00001-of-00001.safetensors": _blob(7, 2048),
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b"{}",
        "special_tokens_map.json": b"{}",
        "chat_template.jinja": b"{{ messages }}",
        "README.md": b"# fake\n",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "original/model.safetensors": _blob(99, 4096),
        "original/config.json": b'{"original": true}',
        "metal/model.bin": _blob(98, 1024),
    }


ALLOWED = {
    "config.json",
    "generation_config.json",
    "model-00000-of-00001.safetensors",
    "model-00001-of-00001.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
}


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _resolved_paths(hub: LocalHub) -> set[str]:
    """Repo paths the client fetched (GET /{repo}/resolve/{rev}/{path})."""
    prefix = f"/{REPO}/resolve/"
    return {
        path[len(prefix) :].split("/", 1)[1]
        for method, path in hub.requests
        if method == "GET" and path.startswith(prefix)
    }


@pytest.fixture(autouse=True)
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the client off ~/.cache/huggingface and away from any real token or endpoint.

    huggingface_hub reads its env vars once, at import, into `constants`: patch both.
    """
    return isolate_hf_client(tmp_path / "hf-home", monkeypatch)


@pytest.fixture
def hub():
    with LocalHub() as server:
        yield server


def _dest(tmp_path: Path, name: str = "dl") -> Path:
    dest = tmp_path / name
    dest.mkdir()
    return dest


def test_downloads_allowed_files_byte_identical(hub: LocalHub, tmp_path: Path) -> None:
    sha = hub.add_commit(REPO, _files(1))
    dest = _dest(tmp_path)

    got = download_snapshot(REPO, "main", PATTERNS, dest, endpoint=hub.endpoint)

    assert got == sha
    assert _tree(dest) == {p: _files(1)[p] for p in ALLOWED}
    assert not (dest / ".cache").exists()
    # excluded files were never requested, not merely deleted afterwards
    assert _resolved_paths(hub) == ALLOWED


def test_hub_cache_untouched_outside_hf_home(hub: LocalHub, tmp_path: Path, hf_home: Path) -> None:
    hub.add_commit(REPO, _files(1))
    download_snapshot(REPO, "main", PATTERNS, _dest(tmp_path), endpoint=hub.endpoint)
    assert not (
        Path.home() / ".cache" / "huggingface" / "hub" / "models--openai--gpt-oss-fake"
    ).exists()


def test_revision_pinning_sha_branch_and_tag(hub: LocalHub, tmp_path: Path) -> None:
    first = hub.add_commit(REPO, _files(1), message="v1")
    hub.add_tag(REPO, "v1.0")
    second = hub.add_commit(REPO, _files(2), message="v2")
    assert first != second
    assert hub.repos[REPO].commits[second].parent == first

    for name, revision, sha, version in [
        ("sha", first, first, 1),
        ("main", "main", second, 2),
        ("tag", "v1.0", first, 1),
        ("short-sha", first[:7], first, 1),
    ]:
        dest = _dest(tmp_path, name)
        assert download_snapshot(REPO, revision, PATTERNS, dest, endpoint=hub.endpoint) == sha
        assert _tree(dest) == {p: _files(version)[p] for p in ALLOWED}, name


def test_second_download_is_byte_identical(hub: LocalHub, tmp_path: Path) -> None:
    hub.add_commit(REPO, _files(1))
    a, b = _dest(tmp_path, "a"), _dest(tmp_path, "b")
    sha_a = download_snapshot(REPO, "main", PATTERNS, a, endpoint=hub.endpoint)
    sha_b = download_snapshot(REPO, "main", PATTERNS, b, endpoint=hub.endpoint)
    assert sha_a == sha_b
    assert _tree(a) == _tree(b)
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == sorted(
        p.relative_to(b) for p in b.rglob("*")
    )


def test_star_matches_across_folders(hub: LocalHub, tmp_path: Path) -> None:
    """Why the default says `model-*.safetensors`: fnmatch's `*` also matches `/`."""
    hub.add_commit(REPO, _files(1))
    dest = _dest(tmp_path)
    download_snapshot(REPO, "main", ["*.safetensors"], dest, endpoint=hub.endpoint)
    assert "original/model.safetensors" in _tree(dest)


def test_no_file_matched(hub: LocalHub, tmp_path: Path) -> None:
    hub.add_commit(REPO, _files(1))
    dest = _dest(tmp_path)
    with pytest.raises(TierquantError) as err:
        download_snapshot(REPO, "main", ["*.gguf"], dest, endpoint=hub.endpoint)
    message = str(err.value)
    assert "*.gguf" in message and REPO in message and "config.json" in message
    assert not any(dest.iterdir())


def test_missing_repo(hub: LocalHub, tmp_path: Path) -> None:
    hub.add_commit(REPO, _files(1))
    for revision in ("main", "a" * 40):
        with pytest.raises(TierquantError) as err:
            download_snapshot(
                "nobody/missing",
                revision,
                PATTERNS,
                _dest(tmp_path, revision[:4]),
                endpoint=hub.endpoint,
            )
        assert "nobody/missing" in str(err.value) and "model.repo_id" in str(err.value)


def test_missing_revision(hub: LocalHub, tmp_path: Path) -> None:
    hub.add_commit(REPO, _files(1))
    for revision in ("no-such-branch", "0" * 40):
        dest = _dest(tmp_path, revision[:4])
        with pytest.raises(TierquantError) as err:
            download_snapshot(REPO, revision, PATTERNS, dest, endpoint=hub.endpoint)
        message = str(err.value)
        assert revision in message and REPO in message and "model.revision" in message
        assert not any(dest.iterdir())


def test_unreachable_hub(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TierquantError, match="cannot reach the Hub"):
        download_snapshot(
            REPO, "main", PATTERNS, _dest(tmp_path), endpoint=f"http://127.0.0.1:{port}"
        )


def test_dest_must_be_empty(hub: LocalHub, tmp_path: Path) -> None:
    hub.add_commit(REPO, _files(1))
    dest = _dest(tmp_path)
    (dest / "stale").write_text("x")
    with pytest.raises(TierquantError, match="empty directory"):
        download_snapshot(REPO, "main", PATTERNS, dest, endpoint=hub.endpoint)


def test_token_required(tmp_path: Path) -> None:
    with LocalHub(require_token="hf_secret") as hub:
        hub.add_commit(REPO, _files(1))
        with pytest.raises(TierquantError) as err:
            download_snapshot(
                REPO, "main", PATTERNS, _dest(tmp_path, "none"), endpoint=hub.endpoint
            )
        assert "HF_TOKEN" in str(err.value) and REPO in str(err.value)

        with pytest.raises(TierquantError, match="HF_TOKEN"):
            download_snapshot(
                REPO,
                "main",
                PATTERNS,
                _dest(tmp_path, "bad"),
                token="hf_wrong",
                endpoint=hub.endpoint,
            )

        dest = _dest(tmp_path, "good")
        download_snapshot(REPO, "main", PATTERNS, dest, token="hf_secret", endpoint=hub.endpoint)
        assert _tree(dest) == {p: _files(1)[p] for p in ALLOWED}


_CHILD = """
import json, sys
from pathlib import Path
from tierquant.source.hub import download_snapshot
print(download_snapshot(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])))
"""


@pytest.mark.parametrize("with_token", [True, False])
def test_env_endpoint_and_token_in_subprocess(tmp_path: Path, hf_home: Path, with_token: bool):
    """HF_ENDPOINT / HF_TOKEN are read by the client itself (HF_ENDPOINT at import)."""
    with LocalHub(require_token="hf_secret") as hub:
        sha = hub.add_commit(REPO, _files(1))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(
            HF_ENDPOINT=hub.endpoint,
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            PYTHONPATH=str(ROOT),
        )
        if with_token:
            env["HF_TOKEN"] = "hf_secret"
        dest = _dest(tmp_path)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, REPO, "main", json.dumps(PATTERNS), str(dest)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    if with_token:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == sha
        assert _tree(dest) == {p: _files(1)[p] for p in ALLOWED}
        assert hub.requests, "the child must have talked to the LocalHub"
    else:
        assert proc.returncode != 0
        assert "TierquantError" in proc.stderr and "set HF_TOKEN" in proc.stderr


def test_server_headers_and_ranges(hub: LocalHub) -> None:
    """What the client's HEAD sees, and Range support for resumed downloads."""
    sha = hub.add_commit(REPO, _files(1))
    shard = "model-00000-of-00001.safetensors"
    lfs = get_hf_file_metadata(hf_hub_url(REPO, shard, revision=sha, endpoint=hub.endpoint))
    assert lfs.commit_hash == sha and lfs.size == 3000 and lfs.xet_file_data is None
    assert len(lfs.etag) == 64  # LFS files: sha256 via X-Linked-Etag
    small = get_hf_file_metadata(
        hf_hub_url(REPO, "config.json", revision="main", endpoint=hub.endpoint)
    )
    assert small.etag == git_blob_sha1(_files(1)["config.json"])

    url = hf_hub_url(REPO, shard, revision="main", endpoint=hub.endpoint)
    req = urllib.request.Request(url, headers={"Range": "bytes=1000-"})
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == "bytes 1000-2999/3000"
        assert resp.read() == _files(1)[shard][1000:]


def test_server_model_info_and_tree(hub: LocalHub) -> None:
    """The read API the client parses: model_info (with blobs) and tree listings."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    sha = hub.add_commit(REPO, _files(1))
    api = HfApi(endpoint=hub.endpoint)
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == sha and info.id == REPO
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == set(_files(1))
    assert siblings["original/model.safetensors"].lfs is not None
    assert siblings["config.json"].lfs is None and siblings["config.json"].size > 0

    top = {e.path: e for e in api.list_repo_tree(REPO, revision=sha)}
    assert isinstance(top["original"], RepoFolder) and isinstance(top["config.json"], RepoFile)
    assert "original/config.json" not in top
    sub = [e.path for e in api.list_repo_tree(REPO, "original", revision="main")]
    assert sub == ["original/config.json", "original/model.safetensors"]
