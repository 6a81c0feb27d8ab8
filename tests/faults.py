"""Helpers of the fault-injection suite (tests/test_faults.py): process kills, cache and
tree checks, and the bad checkpoints it feeds the stages."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.conftest import PYTHON, REPO
from tierquant.core.checkpoint import INDEX_NAME, NUMPY_DTYPES, read_header

SHIM = REPO / "tests" / "faultshim.py"


# --- running dvc with a fault -------------------------------------------------------------


def dvc_env(extra: dict[str, str] | None = None, shim_dir: Path | None = None) -> dict:
    """The environment `dvc` runs stages in: the venv's python first on PATH, or the
    fault shim's `python` (tests/faultshim.py) when `shim_dir` is given."""
    env = dict(os.environ)
    path = [str(Path(PYTHON).parent), env.get("PATH", "")]
    if shim_dir is not None:
        shim_dir.mkdir(parents=True, exist_ok=True)
        python = shim_dir / "python"
        python.write_text(f'#!/bin/sh\nexec "{PYTHON}" "{SHIM}" "$@"\n')
        python.chmod(0o755)
        path.insert(0, str(shim_dir))
    env["PATH"] = os.pathsep.join(path)
    env.update({"DVC_NO_ANALYTICS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"})
    env.update(extra or {})
    return env


def fault_env(shim_dir: Path, stage: str, mode: str, seconds: float, marker: Path) -> dict:
    """Environment for `dvc repro` that injects `mode` into `stage` (see faultshim.py)."""
    return dvc_env(
        {
            "TIERQUANT_FAULT_STAGE": stage,
            "TIERQUANT_FAULT_MODE": mode,
            "TIERQUANT_FAULT_SECONDS": str(seconds),
            "TIERQUANT_FAULT_MARKER": str(marker),
        },
        shim_dir,
    )


def start(cmd: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    """Start `cmd` in its own process group (so the whole of it can be killed)."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until the shim's stall has begun (the marker holds the stage's pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.is_file() and marker.read_text().strip():
            return int(marker.read_text())
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before the fault\n{out}\n{err}")
        time.sleep(0.05)
    kill_group(proc)
    raise AssertionError(f"no stall within {timeout} s")


def kill_group(proc: subprocess.Popen, stage_pid: int | None = None) -> None:
    """SIGKILL `proc`'s whole process group (dvc, its shell, the stage) and the stage."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if stage_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stage_pid, signal.SIGKILL)
    proc.communicate()


def tree_size(path: Path) -> int:
    """Bytes held under `path` (a file or a directory)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- outputs and the DVC cache ------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digest_tree(repo: Path, folders=("data", "metrics")) -> dict[str, str]:
    """sha256 of every file under `folders` of `repo`, by relative path."""
    out = {}
    for folder in folders:
        for p in sorted((repo / folder).rglob("*")):
            if p.is_file():
                out[p.relative_to(repo).as_posix()] = sha256(p)
    return out


def temporaries(repo: Path) -> list[str]:
    """Leftover `.<name>.tmp` temporaries of atomic_output under data/ and metrics/."""
    return sorted(
        p.relative_to(repo).as_posix()
        for folder in ("data", "metrics")
        for p in (repo / folder).rglob(".*.tmp")
    )


def check_cache(repo: Path) -> int:
    """Every object in the DVC cache hashes to its name, and no directory listing names a
    temporary (tierquant.check.cache, what `tierquant cache verify` runs); returns the number
    of objects checked."""
    from tierquant.check.cache import verify_cache

    report = verify_cache(repo, evict=False, cache_dir=repo / ".dvc" / "cache" / "files" / "md5")
    assert not report.corrupt, [
        f"corrupt cache object {c.path}: {c.reason}" for c in report.corrupt
    ]
    return report.checked


def locked_stages(repo: Path) -> dict:
    """dvc.lock's stages (empty when there is no dvc.lock)."""
    import yaml

    path = repo / "dvc.lock"
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {})


# --- bad checkpoints ------------------------------------------------------------------------


def _tensors(path: Path) -> list[tuple[str, str, list[int], bytes]]:
    infos, _ = read_header(path)
    out = []
    with open(path, "rb") as f:
        for info in sorted(infos.values(), key=lambda i: i.offset):
            f.seek(info.offset)
            out.append((info.name, info.dtype, list(info.shape), f.read(info.nbytes)))
    return out


def write_shard(path: Path, tensors: list[tuple[str, str, list[int], bytes]]) -> None:
    """A safetensors file holding `tensors` (name, dtype, shape, raw bytes), written fresh."""
    header, offset = {}, 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for *_, raw in tensors:
            f.write(raw)


def _index(root: Path) -> dict:
    return json.loads((root / INDEX_NAME).read_text())


def _write_index(root: Path, index: dict) -> None:
    (root / INDEX_NAME).unlink()
    (root / INDEX_NAME).write_text(json.dumps(index))


def _shard_of(root: Path, tensor: str) -> Path:
    return root / _index(root)["weight_map"][tensor]


def _edit_shard(root: Path, shard: Path, edit: Callable[[list], list]) -> None:
    write_shard(shard, edit(_tensors(shard)))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.unlink()
    path.write_text(json.dumps(data))


def _replace_file(path: Path, text: str) -> None:
    path.unlink()
    path.write_text(text)


SCALES = "model.layers.1.mlp.experts.gate_up_proj_scales"
DOWN_SCALES = "model.layers.2.mlp.experts.down_proj_scales"
ROUTER = "model.layers.0.mlp.router.weight"


def header_claims_too_much(root: Path) -> tuple[str, ...]:
    """The first shard's 8-byte header length claims more bytes than the file has."""
    shard = sorted(root.glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) + 4096)
    shard.unlink()
    shard.write_bytes(bytes(raw))
    return (shard.name, "claims")


def data_truncated(root: Path) -> tuple[str, ...]:
    """The last shard is cut short: its header's tensors reach past the end."""
    shard = sorted(root.glob("model-*.safetensors"))[-1]
    raw = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(raw[: len(raw) // 2])
    return (shard.name, "truncated")


def header_not_json(root: Path) -> tuple[str, ...]:
    """The first shard's header is not JSON."""
    shard = sorted(root.glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[8:16] = b"\xff{garbag"
    shard.unlink()
    shard.write_bytes(bytes(raw))
    return (shard.name, "does not parse")


def duplicate_across_shards(root: Path) -> tuple[str, ...]:
    """A tensor of one shard is also stored in another shard."""
    shards = sorted(root.glob("model-*.safetensors"))
    extra = _tensors(shards[1])[0]
    _edit_shard(root, shards[0], lambda ts: [*ts, extra])
    return (extra[0], "appears in both")


def index_names_other_shard(root: Path) -> tuple[str, ...]:
    """The index maps a tensor to a shard that holds other tensors, not it."""
    index = _index(root)
    shard = index["weight_map"][ROUTER]
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    index["weight_map"][ROUTER] = other
    _write_index(root, index)
    return (ROUTER, INDEX_NAME, other)


def index_names_missing_shard(root: Path) -> tuple[str, ...]:
    """The index names a shard file that does not exist."""
    index = _index(root)
    index["weight_map"][ROUTER] = "model-00009-of-00009.safetensors"
    _write_index(root, index)
    return ("model-00009-of-00009.safetensors", "missing")


def stray_shard(root: Path) -> tuple[str, ...]:
    """A shard that the index does not name lies beside the others."""
    write_shard(root / "model-extra.safetensors", [("x", "U8", [1], b"\0")])
    return ("model-extra.safetensors", "not named by")


def fewer_layers_in_config(root: Path) -> tuple[str, ...]:
    """config.json says one layer fewer than the tensors hold."""
    config = json.loads((root / "config.json").read_text())
    n = config["num_hidden_layers"] - 1
    _edit_json(root / "config.json", num_hidden_layers=n, layer_types=config["layer_types"][:n])
    return (f"model.layers.{n}.", "num_hidden_layers", "config.json")


def more_layers_in_config(root: Path) -> tuple[str, ...]:
    """config.json says one layer more than the tensors hold."""
    config = json.loads((root / "config.json").read_text())
    n = config["num_hidden_layers"]
    types = [*config["layer_types"], config["layer_types"][0]]
    _edit_json(root / "config.json", num_hidden_layers=n + 1, layer_types=types)
    return (f"model.layers.{n}.", "is missing", "config.json")


def expert_count_in_config(root: Path) -> tuple[str, ...]:
    """config.json's num_local_experts disagrees with the expert tensors."""
    _edit_json(root / "config.json", num_local_experts=16)
    return (ROUTER, "config.json implies")


def config_not_json(root: Path) -> tuple[str, ...]:
    """config.json is cut off mid-object."""
    text = (root / "config.json").read_text()
    _replace_file(root / "config.json", text[: len(text) // 2])
    return ("config.json", "not valid JSON")


def config_key_wrong_type(root: Path) -> tuple[str, ...]:
    """A config.json key has the wrong type."""
    _edit_json(root / "config.json", hidden_size="128")
    return ("config.json", "hidden_size")


def tokenizer_not_json(root: Path) -> tuple[str, ...]:
    """tokenizer.json is cut off mid-object."""
    text = (root / "tokenizer.json").read_text()
    _replace_file(root / "tokenizer.json", text[: len(text) // 3])
    return ("tokenizer.json", "not valid JSON")


def tokenizer_not_a_tokenizer(root: Path) -> tuple[str, ...]:
    """tokenizer.json is JSON but not a tokenizer."""
    _replace_file(root / "tokenizer.json", json.dumps({"version": "1.0", "model": {"type": "?"}}))
    return ("tokenizer.json", "does not load as a tokenizer")


def tokenizer_config_not_json(root: Path) -> tuple[str, ...]:
    """tokenizer_config.json is not JSON."""
    _replace_file(root / "tokenizer_config.json", "{'chat_template': None}")
    return ("tokenizer_config.json", "not valid JSON")


def nan_scale(root: Path) -> tuple[str, ...]:
    """One E8M0 scale byte of an expert is 255 (NaN in the MX spec)."""

    def edit(tensors):
        out = []
        for name, dtype, shape, raw in tensors:
            if name == SCALES:
                raw = bytearray(raw)
                raw[len(raw) // 2] = 255
                raw = bytes(raw)
            out.append((name, dtype, shape, raw))
        return out

    _edit_shard(root, _shard_of(root, SCALES), edit)
    return (SCALES, "255")


def scales_wrong_shape(root: Path) -> tuple[str, ...]:
    """An expert's scales are one column short of what its blocks need."""

    def edit(tensors):
        out = []
        for name, dtype, shape, raw in tensors:
            if name == SCALES:
                a = np.frombuffer(raw, NUMPY_DTYPES[dtype]).reshape(shape)[..., :-1]
                shape, raw = list(a.shape), np.ascontiguousarray(a).tobytes()
            out.append((name, dtype, shape, raw))
        return out

    _edit_shard(root, _shard_of(root, SCALES), edit)
    return (SCALES, "config.json implies")


def scales_missing(root: Path) -> tuple[str, ...]:
    """An expert's _scales tensor is missing (from its shard and the index)."""
    shard = _shard_of(root, DOWN_SCALES)
    _edit_shard(root, shard, lambda ts: [t for t in ts if t[0] != DOWN_SCALES])
    index = _index(root)
    del index["weight_map"][DOWN_SCALES]
    _write_index(root, index)
    return (DOWN_SCALES, "is missing")


# Every way a checkpoint can be broken, with the strings its error must contain.
BAD_CHECKPOINTS: dict[str, Callable[[Path], tuple[str, ...]]] = {
    f.__name__: f
    for f in (
        header_claims_too_much,
        data_truncated,
        header_not_json,
        duplicate_across_shards,
        index_names_other_shard,
        index_names_missing_shard,
        stray_shard,
        fewer_layers_in_config,
        more_layers_in_config,
        expert_count_in_config,
        config_not_json,
        config_key_wrong_type,
        tokenizer_not_json,
        tokenizer_not_a_tokenizer,
        tokenizer_config_not_json,
        nan_scale,
        scales_wrong_shape,
        scales_missing,
    )
}
