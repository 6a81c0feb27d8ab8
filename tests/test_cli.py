"""The `tierquant` command, the DVC cache check, the headline metrics, stage errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, run, run_stage
from tierquant import cli
from tierquant.check.cache import verify_cache
from tierquant.report.headline import COLUMNS, quality_headline, speed_headline


def test_stage_list_matches_the_stage_scripts():
    scripts = {p.stem for p in (REPO / "stages").glob("*.py")}
    assert [name for name, _ in cli.STAGES] and {name for name, _ in cli.STAGES} == scripts


def test_console_script_help_lists_stages_and_cache_verify():
    exe = Path(PYTHON).parent / "tierquant"
    cmd = [str(exe)] if exe.is_file() else [PYTHON, "-m", "tierquant.cli"]
    proc = run([*cmd, "--help"], REPO)
    for name, what in cli.STAGES:
        assert name in proc.stdout and what.split()[0] in proc.stdout
    assert "cache verify" in proc.stdout and "compare" in proc.stdout


@pytest.mark.parametrize("stage", ["benchmark", "quantize", "validate"])
def test_every_stage_help_works(stage):
    proc = run([PYTHON, "-m", "tierquant.cli", stage, "--help"], REPO)
    assert proc.stdout.startswith(f"usage: tierquant {stage} ") and not proc.stderr
    assert f"   or: python stages/{stage}.py" in proc.stdout


def test_a_bad_param_prints_one_error_line_once():
    proc = run_stage("validate", "validate.bpw_tolerance=-1")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: params: validate.bpw_tolerance must be in [0, inf), got -1.0"
    ]
    assert "bpw_tolerance" not in proc.stdout and "Traceback" not in proc.stderr


def _object(cache: Path, data: bytes, name: str | None = None) -> Path:
    name = name or hashlib.md5(data).hexdigest()
    path = cache / name[:2] / name[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_verify_cache_evicts_corrupt_objects_and_their_links(tmp_path):
    cache = tmp_path / ".dvc" / "cache" / "files" / "md5"
    good = _object(cache, b"good bytes")
    bad = _object(cache, b"original bytes")
    listing = json.dumps([{"md5": "0" * 32, "relpath": ".x.tmp/a"}]).encode()
    bad_dir = _object(cache, listing, hashlib.md5(listing).hexdigest() + ".dir")
    out = tmp_path / "data" / "float"
    out.mkdir(parents=True)
    os.link(bad, out / "shard.safetensors")  # a hardlinked output ...
    with open(out / "shard.safetensors", "r+b") as f:  # ... edited in place
        f.write(b"EDITED")
    os.link(good, out / "fine.bin")
    (out / "copy.bin").write_bytes(b"original bytes")  # same name, not a link: kept

    report = verify_cache(tmp_path, evict=False, cache_dir=cache)
    assert report.checked == 3 and {c.path for c in report.corrupt} == {bad, bad_dir}
    assert bad.exists() and not report.evicted

    report = verify_cache(tmp_path, cache_dir=cache)
    linked = {c.path: c.linked for c in report.corrupt}
    assert linked[bad] == [out / "shard.safetensors"] and linked[bad_dir] == []
    assert not bad.exists() and not bad_dir.exists() and good.exists()
    assert not (out / "shard.safetensors").exists()
    assert (out / "fine.bin").exists() and (out / "copy.bin").exists()
    assert verify_cache(tmp_path, cache_dir=cache).corrupt == []


def test_cache_verify_command_exit_codes(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    _object(cache, b"fine")
    ok = run([PYTHON, "-m", "tierquant.cli", "cache", "verify", "--repo", str(repo)], repo)
    assert "cache ok: 1 objects" in ok.stdout
    _object(cache, b"not what the name says", "ab" + "c" * 30)
    cmd = [PYTHON, "-m", "tierquant.cli", "cache", "verify", "--repo", str(repo)]
    bad = run(cmd, tmp_path, check=False)
    assert bad.returncode == 1 and "1 of 2 cache objects were evicted" in bad.stdout


def test_headline_keys():
    validate = {
        "passed": False,
        "bits_per_weight": 4.34413,
        "model_bytes": 2**29,
        "kld_mean": 1.31,
        "top1_agreement": 0.2662,
        "kld_p99": 3.4,
    }
    assert quality_headline(validate) == {
        "passed": False,
        "bpw": 4.3441,
        "GiB": 0.5,
        "kld_mean": 1.31,
        "top1": 0.2662,
    }
    assert quality_headline(None) == {"passed": False}  # validate could not measure
    bench = {
        "speed": {
            "256": {"generation_tps": {"median": 1.0}, "prefill_tps": {"median": 2}},
            "64": {"generation_tps": {"median": 14.04}, "prefill_tps": {"median": 23.77}},
        },
        "memory": {"peak_gib": 0.00634},
    }
    assert speed_headline(bench, "model") == {
        "gen_tok_s": 14.04,
        "prefill_tok_s": 23.77,
        "peak_memory_gib": 0.0063,
    }
    assert set(speed_headline(bench, "original")) == {
        "orig_gen_tok_s",
        "orig_prefill_tok_s",
        "orig_peak_memory_gib",
    }
    assert set(quality_headline(validate)) | set(speed_headline(bench, "model")) == set(COLUMNS)
