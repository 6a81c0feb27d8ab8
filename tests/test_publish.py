"""tierquant.report.publish through the real huggingface_hub client against the LocalHub.

Two upload paths, both what huggingface_hub 2.4.0 really does:
- `pipeline`: hf_xet installed (the default): `upload_folder` runs the streamed
  multi-commit pipeline; the server answers `regular` for every file so xet never starts.
- `lfs`: hf_xet disabled: `upload_folder` -> `create_commit`; `*.safetensors` are LFS
  (batch API, basic PUT, verify), the rest regular (base64 in the ndjson commit).
"""

from __future__ import annotations

import json
import os
import time
import types
from pathlib import Path

import pytest
from hubserver import LocalHub
from huggingface_hub import HfApi, constants

from stages.publish import run as publish  # the stage's call of tierquant.report.publish
from tests.conftest import build_model, isolate_hf_client, run_stage
from tierquant.config import Config, compose, validate
from tierquant.errors import TierquantError

TOKEN = "hf_TESTtoken_s3cr3t_0123456789"
REPO = "tester/tiny-tierquant-seed"
ROOT = Path(__file__).resolve().parents[1]
PASSED = {
    "kld_mean": 0.5,
    "kld_median": 0.4,
    "kld_p99": 2.0,
    "top1_agreement": 0.5,
    "ppl_ratio": 1.1,
    "tokens": 2032,
    "windows": 16,
    "top_k": 64,
    "structure_problems": 0,
    "passed": True,
}


@pytest.fixture(autouse=True)
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the client off ~/.cache/huggingface and away from any real token/endpoint;
    no retry waits (huggingface_hub backs off 1+2+4+8+8 s on a 5xx)."""
    import huggingface_hub.utils._http as http

    home = isolate_hf_client(tmp_path / "hf-home", monkeypatch)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    fast_time = types.SimpleNamespace(
        **{n: getattr(time, n) for n in dir(time) if not n.startswith("_")}
    )
    fast_time.sleep = lambda seconds: None
    monkeypatch.setattr(http, "time", fast_time)
    return home


@pytest.fixture(params=["pipeline", "lfs"])
def hub(request, monkeypatch: pytest.MonkeyPatch):
    """A LocalHub requiring TOKEN, as HF_ENDPOINT; `hub.mode` is the upload path."""
    if request.param == "pipeline":
        server = LocalHub(require_token=TOKEN, lfs_patterns=(), lfs_threshold=1 << 40)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    else:
        server = LocalHub(require_token=TOKEN)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        server.mode = request.param
        yield server


@pytest.fixture(scope="module")
def builds(tiny_original: Path, tiny_float: Path, tmp_path_factory) -> dict[str, Path]:
    """The tiny model built twice, experts at 3 and at 4 bits, each with its card."""
    from stages.card import run as build_card

    out = {}
    for bits in (3, 4):
        root = tmp_path_factory.mktemp(f"experts{bits}")
        build_model(root, tiny_original, tiny_float, [f"tiers.experts={bits}"])
        (root / "validate.json").write_text(json.dumps(PASSED))
        build_card(_config(root, [f"tiers.experts={bits}"]))
        out[bits] = root
    return out


def _config(root: Path, overrides: list[str] = (), **publish) -> Config:
    paths = {
        "plan": root / "plan",
        "quantized": root / "quantized",
        "model": root / "model",
        "size_metrics": root / "size.json",
        "validate": root / "validate.json",
        "benchmark": root / "benchmark",
        "machine": root / "machine.json",
        "card": root / "card",
        "publish": root / "publish.json",
    }
    args = [f"paths.{k}={v}" for k, v in paths.items()]
    args += [f"publish.{k}={json.dumps(v)}" for k, v in publish.items()]
    args += ["publish.repo_id=" + publish.get("repo_id", REPO)]
    return validate(compose([*overrides, *args]))


def _push(root: Path, bits: int = 3, **publish) -> dict:
    return publish_cfg(_config(root, [f"tiers.experts={bits}"], push=True, **publish))


def publish_cfg(config: Config) -> dict:
    return publish(config)


def _local_tree(root: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in (root / "model").iterdir() if p.is_file()}
    files["README.md"] = (root / "card" / "README.md").read_bytes()
    return files


def _receipt(root: Path) -> dict:
    return json.loads((root / "publish.json").read_text())


def _commit_posts(hub: LocalHub) -> int:
    return sum(1 for m, p in hub.requests if m == "POST" and "/commit/" in p)


def test_dry_run_lists_every_file_and_touches_no_network(builds, hub: LocalHub) -> None:
    root = builds[3]
    receipt = publish(_config(root, ["tiers.experts=3"]))
    assert receipt == _receipt(root)
    assert receipt["status"] == "dry-run" and receipt["commit"] is None
    assert receipt["repo_id"] == REPO and receipt["revision"] == "main"
    local = _local_tree(root)
    assert [f["path"] for f in receipt["files"]] == sorted(local)
    for f in receipt["files"]:
        import hashlib

        assert f["size"] == len(local[f["path"]])
        assert f["sha256"] == hashlib.sha256(local[f["path"]]).hexdigest()
    assert receipt["source"]["params_hash"] and receipt["validation"]["passed"] is True
    assert hub.requests == []


def test_first_publish_uploads_every_file(builds, hub: LocalHub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    root = builds[3]
    receipt = _push(root)

    repo = hub.repos[REPO]
    head = repo.commits[repo.branches["main"]]
    assert receipt["status"] == "pushed" and receipt["commit"]["oid"] == head.sha
    assert dict(head.files) == {**_local_tree(root), ".gitattributes": hub.gitattributes()}
    assert receipt["changed"] == sorted(_local_tree(root)) and receipt["deleted"] == []
    # one commit on top of the repo's initial commit, carrying every file
    ((_, ref, sha, kinds),) = hub.commits_log
    assert ref == "main" and sha == head.sha and set(kinds) == set(_local_tree(root))
    shards = {p for p in kinds if p.endswith(".safetensors")}
    expect = "lfsFile" if hub.mode == "lfs" else "file"
    assert {kinds[p] for p in shards} == {expect}
    assert {kinds[p] for p in set(kinds) - shards} == {"file"}
    assert head.lfs == (shards if hub.mode == "lfs" else set())
    # the message names the git revision and the params hash
    assert receipt["source"]["params_hash"] in head.message
    assert head.message.startswith("tierquant ")
    assert not any("xet" in p for _, p in hub.requests)


def test_second_publish_with_nothing_changed_makes_no_commit(
    builds, hub: LocalHub, monkeypatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    root = builds[3]
    first = _push(root)
    commits, posts = len(hub.repos[REPO].commits), _commit_posts(hub)

    second = _push(root)
    assert second["status"] == "unchanged" and second["changed"] == []
    assert second["commit"]["oid"] == first["commit"]["oid"]
    assert len(hub.repos[REPO].commits) == commits and _commit_posts(hub) == posts


def test_client_itself_skips_unchanged_files(builds, hub: LocalHub) -> None:
    """The server's preupload oids let upload_folder drop unchanged files on its own."""
    root = builds[3]
    api = HfApi(token=TOKEN)
    api.create_repo(REPO, exist_ok=True)
    api.upload_folder(repo_id=REPO, folder_path=root / "model", commit_message="one")
    commits = len(hub.repos[REPO].commits)
    info = api.upload_folder(repo_id=REPO, folder_path=root / "model", commit_message="two")
    assert len(hub.repos[REPO].commits) == commits
    assert info.oid == hub.repos[REPO].branches["main"]


def test_changed_tier_uploads_only_changed_files(builds, hub: LocalHub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _push(builds[3])
    before = dict(hub.repos[REPO].commits[hub.repos[REPO].branches["main"]].files)

    receipt = _push(builds[4], bits=4)
    new = _local_tree(builds[4])
    differing = {p for p in new if before.get(p) != new[p]}
    # experts 3 -> 4 bits: the experts' shards, config.json (quantization map), the
    # index (sizes), the card; never the tokenizer files or other tiers' shards
    assert {"config.json", "README.md"} <= differing
    assert "tokenizer.json" not in differing and "chat_template.jinja" not in differing
    assert any(p.endswith(".safetensors") for p in differing)
    assert len([p for p in new if p.endswith(".safetensors")]) > len(
        [p for p in differing if p.endswith(".safetensors")]
    )
    _, _, sha, kinds = hub.commits_log[-1]
    assert set(kinds) == differing == set(receipt["changed"])
    head = hub.repos[REPO].commits[sha]
    assert {p: head.files[p] for p in new} == new


def test_stale_shards_are_deleted(builds, hub: LocalHub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _push(builds[3])
    hub.commit_on(
        hub.repos[REPO], "main", {"model-00009-of-00009.safetensors": b"old"}, (), "stale"
    )
    receipt = _push(builds[3])
    assert receipt["deleted"] == ["model-00009-of-00009.safetensors"]
    head = hub.repos[REPO].commits[hub.repos[REPO].branches["main"]]
    assert "model-00009-of-00009.safetensors" not in head.files


def test_pr_mode_opens_a_pull_request(builds, hub: LocalHub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    first = _push(builds[3])
    receipt = _push(builds[4], bits=4, create_pr=True)

    repo = hub.repos[REPO]
    assert receipt["status"] == "pushed" and receipt["commit"]["pr_url"].endswith(
        f"{REPO}/discussions/1"
    )
    assert list(repo.prs) == [1]
    assert repo.branches["main"] == first["commit"]["oid"]  # main untouched
    pr_head = repo.commits[repo.branches["refs/pr/1"]]
    assert pr_head.sha == receipt["commit"]["oid"]
    assert {p: pr_head.files[p] for p in _local_tree(builds[4])} == _local_tree(builds[4])

    # nothing changed against main: no PR at all
    again = _push(builds[3], create_pr=True)
    assert again["status"] == "unchanged" and list(repo.prs) == [1]


def test_tag_and_private_repo(builds, hub: LocalHub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    receipt = _push(builds[3], tag="v1.0", private=True)
    repo = hub.repos[REPO]
    assert repo.private and repo.tags == {"v1.0": receipt["commit"]["oid"]}
    assert _push(builds[3], tag="v1.0")["status"] == "unchanged"  # same commit: fine

    with pytest.raises(TierquantError, match="never moved"):
        _push(builds[4], bits=4, tag="v1.0")
    assert _receipt(builds[4])["status"] == "failed"
    assert repo.tags["v1.0"] == receipt["commit"]["oid"]


def test_branch_revision(builds, hub: LocalHub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    receipt = _push(builds[3], revision="release")
    repo = hub.repos[REPO]
    assert repo.branches["release"] == receipt["commit"]["oid"] != repo.branches["main"]


def _no_success(root: Path) -> dict:
    receipt = _receipt(root)
    assert receipt["status"] == "failed" and receipt["commit"] is None
    return receipt


def test_missing_token_fails_before_any_request(builds, hub: LocalHub) -> None:
    with pytest.raises(TierquantError, match="HF_TOKEN"):
        _push(builds[3])
    assert "HF_TOKEN" in _no_success(builds[3])["error"]
    assert hub.requests == []


def test_failed_validation_refuses(builds, hub: LocalHub, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    failed = tmp_path / "validate.json"
    failed.write_text(json.dumps({**PASSED, "passed": False}))
    config = _config(builds[3], ["tiers.experts=3"], push=True)
    config.paths.validate = str(failed)
    with pytest.raises(TierquantError, match="validation failed"):
        publish(config)
    assert _no_success(builds[3])["validation"]["passed"] is False
    config.paths.validate = str(tmp_path / "missing.json")
    with pytest.raises(TierquantError, match="validation has not run"):
        publish(config)
    assert hub.requests == []


def test_a_card_made_from_other_files_is_refused(builds, hub: LocalHub, tmp_path) -> None:
    """After a failed experiment the workspace holds new metrics beside the old card."""
    other = tmp_path / "validate.json"
    other.write_text(json.dumps({**PASSED, "kld_mean": 0.25}))
    config = _config(builds[3], ["tiers.experts=3"])
    config.paths.validate = str(other)
    with pytest.raises(TierquantError, match="made from another validation metrics"):
        publish(config)
    receipt = json.loads(Path(config.paths.publish).read_text())
    assert receipt["status"] == "failed" and receipt["commit"] is None
    assert receipt["source"]["validate_sha256"] and receipt["source"]["model_sha256"]


def test_a_card_written_for_another_repo_is_refused(builds, hub: LocalHub) -> None:
    config = _config(builds[3], ["tiers.experts=3"], repo_id="someone-else/model")
    with pytest.raises(TierquantError, match="is written for 'tester/tiny-tierquant-seed'"):
        publish(config)


def test_server_error_mid_upload(builds, hub: LocalHub, monkeypatch, capsys, caplog) -> None:
    """The commit endpoint fails after the files went up: clear error, no success receipt,
    nothing committed; the rerun succeeds (LFS objects already uploaded are skipped)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail("POST", r"/commit/", status=500, times=None)
    with pytest.raises(TierquantError) as err:
        _push(builds[3])
    message = str(err.value)
    assert "HTTP 500" in message and REPO in message
    receipt = _no_success(builds[3])
    assert "HTTP 500" in receipt["error"]
    repo = hub.repos[REPO]
    assert len(repo.commits) == 1  # the initial .gitattributes commit only
    if hub.mode == "lfs":
        assert hub.lfs_objects  # the shards were uploaded before the commit failed

    hub.faults.clear()
    puts = sum(1 for m, _ in hub.requests if m == "PUT")
    assert _push(builds[3])["status"] == "pushed"
    assert sum(1 for m, _ in hub.requests if m == "PUT") == puts  # nothing re-uploaded
    out = capsys.readouterr()
    for text in (message, json.dumps(receipt), out.out, out.err, caplog.text):
        assert TOKEN not in text


def test_wrong_token_is_a_clear_error(builds, hub: LocalHub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(TierquantError, match="HTTP 401"):
        _push(builds[3])
    _no_success(builds[3])


# -- the stage script, in a subprocess ------------------------------------------------------


def _stage(root: Path, hf_home: Path, *args: str, **env: str):
    overrides = [
        f"paths.model={root / 'model'}",
        f"paths.card={root / 'card'}",
        f"paths.validate={root / 'validate.json'}",
        f"paths.publish={root / 'publish.json'}",
        f"publish.repo_id={REPO}",
        "tiers.experts=3",
    ]
    clean = {k: "" for k in os.environ if k.startswith(("HF_", "HUGGING", "DVC_EXP"))}
    return run_stage(
        "publish",
        *overrides,
        *args,
        cwd=ROOT,
        env={**clean, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", **env},
    )


def test_stage_dry_run_and_refusals(builds, hf_env: Path) -> None:
    root = builds[3]
    proc = _stage(root, hf_env)
    assert proc.returncode == 0, proc.stderr
    assert _receipt(root)["status"] == "dry-run"

    proc = _stage(root, hf_env, "publish.push=true")
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert "Traceback" not in proc.stderr
    _no_success(root)

    proc = _stage(root, hf_env, "publish.push=true", HF_TOKEN=TOKEN, DVC_EXP_BASELINE_REV="abc")
    assert proc.returncode == 1 and "dvc exp run" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr + (root / "publish.json").read_text()


def test_stage_push_in_subprocess(builds, hf_env: Path) -> None:
    """HF_ENDPOINT and HF_TOKEN as the release workflow sets them."""
    root = builds[3]
    with LocalHub(require_token=TOKEN) as server:
        proc = _stage(
            root,
            hf_env,
            "publish.push=true",
            "publish.tag=v0.1",
            HF_TOKEN=TOKEN,
            HF_ENDPOINT=server.endpoint,
            HF_HUB_DISABLE_XET="1",
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        receipt = _receipt(root)
        assert receipt["status"] == "pushed"
        assert server.repos[REPO].tags["v0.1"] == receipt["commit"]["oid"]
    assert TOKEN not in proc.stdout + proc.stderr + (root / "publish.json").read_text()
