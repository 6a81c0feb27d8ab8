"""The download stage: a verified data/original, or a clear error and nothing at all."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_stage
from tierquant.core.gptoss import verify_original
from tierquant.errors import TierquantError
from tierquant.source.hub import DEFAULT_ALLOW_PATTERNS


@pytest.fixture
def original_copy(tiny_original, tmp_path):
    return shutil.copytree(tiny_original, tmp_path / "original")


def _edit_config(root, **changes):
    config = json.loads((root / "config.json").read_text())
    config.update(changes)
    (root / "config.json").write_text(json.dumps(config))


def test_shape_disagreeing_with_config_is_named(original_copy):
    config = json.loads((original_copy / "config.json").read_text())
    _edit_config(original_copy, hidden_size=config["hidden_size"] * 2)
    with pytest.raises(TierquantError, match=r"model\.embed_tokens\.weight.*config\.json implies"):
        verify_original(original_copy)


def test_layer_count_disagreeing_with_tensors(original_copy):
    config = json.loads((original_copy / "config.json").read_text())
    layers = config["num_hidden_layers"] - 2
    _edit_config(
        original_copy, num_hidden_layers=layers, layer_types=config["layer_types"][:layers]
    )
    with pytest.raises(TierquantError, match=rf"model\.layers\.{layers}\..*not part of"):
        verify_original(original_copy)


def test_expert_count_disagreeing_with_config(original_copy):
    _edit_config(original_copy, num_local_experts=16)
    with pytest.raises(TierquantError, match=r"mlp\.router\.weight.*implies"):
        verify_original(original_copy)


def test_config_key_with_wrong_type(original_copy):
    _edit_config(original_copy, num_hidden_layers="six")
    with pytest.raises(TierquantError, match="num_hidden_layers"):
        verify_original(original_copy)


def test_failed_stage_leaves_no_output(tmp_path):
    out = tmp_path / "original"
    proc = run_stage("download", f"paths.original={out}", "model.synthetic.vocab_size=100")
    assert proc.returncode == 1
    assert "model.synthetic.vocab_size" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failed_stage_keeps_the_previous_output(tmp_path):
    out = tmp_path / "original"
    assert run_stage("download", f"paths.original={out}").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_stage("download", f"paths.original={out}", "model.synthetic.vocab_size=100")
    assert proc.returncode == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.fixture
def served_tiny(tiny_original):
    from tests.hubserver import LocalHub

    with LocalHub() as hub:
        first = hub.add_commit("openai/gpt-oss-tiny", tiny_original, message="upload")
        # A later commit on main that the pinned revision must not see.
        hub.add_commit("openai/gpt-oss-tiny", {"README.md": b"later"}, message="readme")
        yield hub, first


def _hub_stage(hub, out, tmp_path, *overrides):
    if not any(o.startswith("model.repo_id=") for o in overrides):
        overrides = ("model.repo_id=openai/gpt-oss-tiny", *overrides)
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": ""}
    return run_stage(
        "download",
        "model.source=hub",
        "model.synthetic=null",
        f"model.allow_patterns=[{','.join(DEFAULT_ALLOW_PATTERNS)}]",
        f"paths.original={out}",
        *overrides,
        env=env,
    )


def test_download_stage_through_the_hub_protocol(served_tiny, tiny_original, tmp_path):
    hub, first = served_tiny
    out = tmp_path / "original"
    proc = _hub_stage(hub, out, tmp_path, f"model.revision={first}")
    assert proc.returncode == 0, proc.stderr
    assert first in proc.stdout  # the resolved sha is logged
    got = sorted(p.name for p in out.iterdir())
    assert got == sorted(p.name for p in tiny_original.iterdir())  # no README, no .cache
    for name in got:
        assert (out / name).read_bytes() == (tiny_original / name).read_bytes()
    verify_original(out)


@pytest.mark.parametrize(
    "override, named",
    [
        (["model.repo_id=openai/nope", "model.revision=main"], "openai/nope"),
        (["model.revision=v9.9"], "v9.9"),
    ],
)
def test_download_stage_missing_repo_or_revision(served_tiny, tmp_path, override, named):
    hub, _ = served_tiny
    out = tmp_path / "original"
    proc = _hub_stage(hub, out, tmp_path, *override)
    assert proc.returncode == 1
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
