"""Streaming safetensors I/O: round trips, atomic outputs, and bad files named."""

from __future__ import annotations

import json
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest

from tierquant.core.checkpoint import INDEX_NAME, Checkpoint, ShardedWriter, TensorSpec, read_header
from tierquant.core.files import atomic_output
from tierquant.errors import TierquantError


def _write(tmp_path, arrays: dict[str, np.ndarray], max_shard_bytes=64, **kw):
    specs = [
        TensorSpec(
            n,
            {np.dtype("u1"): "U8", np.dtype("<u2"): "BF16", np.dtype("<f4"): "F32"}[a.dtype],
            a.shape,
        )
        for n, a in arrays.items()
    ]
    with ShardedWriter(tmp_path, specs, max_shard_bytes=max_shard_bytes, **kw) as w:
        for name, a in arrays.items():
            if a.ndim and a.shape[0] > 1:  # exercise row-slice streaming
                half = a.shape[0] // 2
                w.write(name, a[:half])
                w.write(name, a[half:])
            else:
                w.write(name, a)
    return specs


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.integers(0, 2**16, (4, 6), dtype=np.uint16),
        "b.blocks": rng.integers(0, 256, (3, 5, 2), dtype=np.uint8),  # odd size: alignment
        "c.bias": rng.standard_normal(7).astype(np.float32),
        "d.weight": rng.integers(0, 2**16, (9, 2), dtype=np.uint16),
    }


def test_round_trip_through_safetensors_and_our_reader(tmp_path):
    arrays = _arrays()
    _write(tmp_path, arrays)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    loaded = {}
    for shard in shards:  # MLX's own reader (what mlx_lm.load uses) agrees byte for byte
        loaded.update(mx.load(str(tmp_path / shard)))
    for name, a in arrays.items():
        got = loaded[name].view(mx.uint16) if loaded[name].dtype == mx.bfloat16 else loaded[name]
        np.testing.assert_array_equal(np.array(got), a)
    with Checkpoint(tmp_path) as ckpt:
        for name, a in arrays.items():
            np.testing.assert_array_equal(ckpt.read(name), a)
        np.testing.assert_array_equal(ckpt.read_rows("d.weight", 3, 7), arrays["d.weight"][3:7])


def test_zero_based_names_and_determinism(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        _write(tmp_path / d, _arrays(), zero_based_names=True, metadata={"format": "pt"})
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert "model-00000-of-00002.safetensors" in names
    for name in names:
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()


def test_incomplete_write_is_an_error(tmp_path):
    spec = TensorSpec("t", "U8", (4,))
    with (
        pytest.raises(ValueError, match="not fully written"),
        ShardedWriter(tmp_path, [spec], max_shard_bytes=100) as w,
    ):
        w.write("t", np.zeros(2, np.uint8))


def test_atomic_output_keeps_old_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out) as tmp:
        (tmp / "f").write_text("good")
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("killed")
    assert (out / "f").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.fixture
def ckpt_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    _write(d, _arrays())
    return d


def _shard(d, k=0):
    return sorted(d.glob("model-*.safetensors"))[k]


def test_truncated_file_is_named(ckpt_dir):
    shard = _shard(ckpt_dir)
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(TierquantError, match=f"{shard.name}.*truncated"):
        Checkpoint(ckpt_dir)


def test_header_that_does_not_parse(ckpt_dir):
    shard = _shard(ckpt_dir)
    raw = bytearray(shard.read_bytes())
    raw[8:10] = b"{{"
    shard.write_bytes(bytes(raw))
    with pytest.raises(TierquantError, match=f"{shard.name}.*does not parse"):
        Checkpoint(ckpt_dir)


def test_header_claiming_more_bytes_than_the_file(ckpt_dir):
    shard = _shard(ckpt_dir)
    raw = bytearray(shard.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) * 10)
    shard.write_bytes(bytes(raw))
    with pytest.raises(TierquantError, match=f"{shard.name}.*claims"):
        read_header(shard)


def test_missing_shard_is_named(ckpt_dir):
    shard = _shard(ckpt_dir, 1)
    shard.unlink()
    with pytest.raises(TierquantError, match=f"{shard.name}.*missing"):
        Checkpoint(ckpt_dir)


def test_duplicate_tensor_across_shards(ckpt_dir):
    (ckpt_dir / INDEX_NAME).unlink()
    shutil.copy(_shard(ckpt_dir, 0), ckpt_dir / "model-extra.safetensors")
    with pytest.raises(TierquantError, match="appears in both"):
        Checkpoint(ckpt_dir)


def test_index_naming_the_wrong_shard(ckpt_dir):
    index = json.loads((ckpt_dir / INDEX_NAME).read_text())
    name = sorted(index["weight_map"])[0]
    other = [s for s in set(index["weight_map"].values()) if s != index["weight_map"][name]][0]
    index["weight_map"][name] = other
    (ckpt_dir / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(TierquantError, match=name) as err:
        Checkpoint(ckpt_dir)
    assert INDEX_NAME in str(err.value)
