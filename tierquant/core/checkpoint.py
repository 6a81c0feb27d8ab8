"""Safetensors checkpoints, one tensor at a time.

Reading parses headers only (a 120B checkpoint's headers in milliseconds) and
reads tensor bytes on demand, whole or as a range of rows along the first axis.
Writing plans the shards from the tensor specs up front, writes each shard's
header first and then streams tensor bytes into place, so peak memory is one
tensor (or one slice), never a shard or a model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tierquant.core.files import read_json, write_json
from tierquant.errors import TierquantError

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000
CHUNK_BYTES = 64 << 20  # bytes read at a time by iter_rows (and so by copy_tensor)

# safetensors dtype -> numpy dtype used to hold the raw bytes (bf16 is kept as its
# uint16 bit pattern: numpy has no bfloat16 and we never do arithmetic on it here).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}


def itemsize(dtype: str) -> int:
    return NUMPY_DTYPES[dtype].itemsize


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, safetensors dtype and shape: what a writer needs up front."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.dtype)


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor's bytes live in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return self.nbytes // rows if rows else 0


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors header; check every tensor's bytes lie inside the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TierquantError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise TierquantError(
                    f"{path}: safetensors header claims {header_len} bytes but the file has "
                    f"{size} bytes; the file is truncated or not safetensors. Re-download it."
                )
            raw = f.read(header_len)
    except OSError as e:
        raise TierquantError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise TierquantError(f"{path}: safetensors header does not parse ({e})") from e

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise TierquantError(f"{path}: tensor {name!r} has a malformed header entry") from e
        if dtype not in NUMPY_DTYPES:
            raise TierquantError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * itemsize(dtype)
        if end - begin != expected or begin < 0:
            raise TierquantError(
                f"{path}: tensor {name!r} has data_offsets {begin}..{end} ({end - begin} bytes) "
                f"but {dtype}{list(shape)} needs {expected} bytes"
            )
        if end > data_size:
            raise TierquantError(
                f"{path}: tensor {name!r} needs bytes up to {data_start + end} but the file has "
                f"{size}; the file is truncated. Re-download or regenerate it."
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, expected)
    return tensors, metadata


class Checkpoint:
    """A directory of safetensors shards (with or without an index), read lazily."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise TierquantError(f"{self.root}: checkpoint directory does not exist")
        self.tensors: dict[str, TensorInfo] = {}
        self.index: dict[str, str] | None = None
        index_path = self.root / INDEX_NAME
        if index_path.exists():
            self.index = _read_index(index_path)
            shards = sorted(set(self.index.values()))
            for shard in shards:
                if not (self.root / shard).is_file():
                    raise TierquantError(
                        f"{index_path}: names shard {shard!r}, which is missing from {self.root}"
                    )
        else:
            shards = sorted(p.name for p in self.root.glob("*.safetensors"))
            if not shards:
                raise TierquantError(f"{self.root}: no *.safetensors files and no {INDEX_NAME}")
        # Every header first, so a tensor held twice is reported as such (not as an
        # index mismatch, which is what the first copy of it looks like).
        for shard in shards:
            infos, _ = read_header(self.root / shard)
            for name, info in infos.items():
                if name in self.tensors:
                    raise TierquantError(
                        f"tensor {name!r} appears in both {self.tensors[name].path.name} and "
                        f"{shard} under {self.root}; a checkpoint must hold each tensor once"
                    )
                self.tensors[name] = info
        if self.index is not None:
            for name, info in self.tensors.items():
                if self.index.get(name) != info.path.name:
                    where = self.index.get(name)
                    raise TierquantError(
                        f"{index_path}: tensor {name!r} is in {info.path.name} but the index "
                        + (f"maps it to {where}" if where else "does not list it")
                    )
            missing = sorted(set(self.index) - set(self.tensors))
            if missing:
                raise TierquantError(
                    f"{index_path}: lists {len(missing)} tensor(s) not found in their shard, "
                    f"first {missing[0]!r} (expected in {self.index[missing[0]]})"
                )
        stray = sorted(p.name for p in self.root.glob("*.safetensors") if p.name not in shards)
        if stray:
            raise TierquantError(
                f"{self.root / stray[0]}: not named by {INDEX_NAME}, but loaders that "
                "read every *.safetensors file (mlx-lm) would load it; remove it"
            )
        self._files: dict[Path, BinaryIO] = {}

    @property
    def config(self) -> dict:
        return read_json(self.root / "config.json")

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint (from the headers)."""
        return sum(t.nbytes for t in self.tensors.values())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise TierquantError(f"{self.root}: tensor {name!r} is missing") from None

    def read(self, name: str) -> np.ndarray:
        """The whole tensor, raw (bf16 as uint16 bit patterns)."""
        info = self.info(name)
        rows = info.shape[0] if info.shape else 1
        return self.read_rows(name, 0, rows)

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None):
        """Rows start..stop along the first axis, raw; `out` reuses a buffer."""
        info = self.info(name)
        dtype = NUMPY_DTYPES[info.dtype]
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        if out is None:
            out = np.empty(shape, dtype=dtype)
        elif out.shape != shape or out.dtype != dtype:
            raise ValueError(f"out buffer {out.dtype}{out.shape} != {dtype}{shape}")
        f = self._file(info.path)
        f.seek(info.offset + start * info.row_bytes)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = f.readinto(view)
        if got != out.nbytes:
            raise TierquantError(f"{info.path}: short read of tensor {name!r} (file truncated?)")
        return out

    def iter_rows(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """The whole tensor, raw, as consecutive slices along its first axis of at most
        `chunk_bytes` each (at least one row; a 0-d tensor in one piece)."""
        info = self.info(name)
        if not info.shape:
            yield self.read(name)
            return
        for start, stop in row_slices(info.shape[0], info.row_bytes, chunk_bytes):
            yield self.read_rows(name, start, stop)

    def read_row_sample(self, name: str, start: int = 0, step: int = 1) -> np.ndarray:
        """Rows start, start+step, ... of a tensor, raw, as [slices, picked, rest]: the row
        axis is the first of a matrix and the second of a stack ([E, rows, ...]); `rest`
        flattens what follows it. A vector is read whole. One row is read at a time."""
        info = self.info(name)
        if len(info.shape) < 2:
            return self.read(name)
        dtype = NUMPY_DTYPES[info.dtype]
        axis = 0 if len(info.shape) == 2 else 1
        lead = int(np.prod(info.shape[:axis], dtype=np.int64))
        rows = info.shape[axis]
        rest = int(np.prod(info.shape[axis + 1 :], dtype=np.int64))
        row_bytes = rest * dtype.itemsize
        picked = range(start, rows, step)
        out = np.empty((lead, len(picked), rest), dtype=dtype)
        f = self._file(info.path)
        for s in range(lead):
            for j, r in enumerate(picked):
                f.seek(info.offset + (s * rows + r) * row_bytes)
                if f.readinto(memoryview(out[s, j].view(np.uint8))) != row_bytes:
                    raise TierquantError(f"{info.path}: short read of tensor {name!r}")
        return out

    def _file(self, path: Path) -> BinaryIO:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def row_slices(rows: int, row_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges covering `rows`, each at most `chunk_bytes` (>= one row)."""
    step = max(1, chunk_bytes // max(1, row_bytes))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _read_index(path: Path) -> dict[str, str]:
    data = read_json(path)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise TierquantError(f"{path}: has no valid 'weight_map' object")
    return weight_map


def shard_name(index: int, count: int, *, zero_based: bool = False, prefix: str = "model") -> str:
    """`model-00001-of-00003.safetensors` (mlx-lm, transformers) or the zero-based
    `model-00000-of-00002.safetensors` the gpt-oss release uses ("of" = last index)."""
    if zero_based:
        return f"{prefix}-{index:05d}-of-{count - 1:05d}.safetensors"
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most max_shard_bytes of data
    (a single larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (size + spec.nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


@dataclass
class _Slot:
    shard: int
    offset: int  # absolute offset in the shard file
    nbytes: int
    written: int = 0


class ShardedWriter:
    """Write a sharded safetensors checkpoint with an index, streaming tensor bytes.

    All tensor specs are known up front, so each shard's header is written first and
    tensor data is then written into its slot, whole (`write`) or as consecutive row
    slices (`write` called repeatedly for one tensor). `close` checks every byte was
    written and writes the index. Use inside `atomic_output` so an interrupted write
    never leaves a complete-looking directory.
    """

    def __init__(
        self,
        out_dir: Path,
        specs: Iterable[TensorSpec],
        *,
        max_shard_bytes: int,
        zero_based_names: bool = False,
        metadata: dict[str, str] | None = None,
        name_prefix: str = "model",
    ) -> None:
        self.out_dir = Path(out_dir)
        specs = list(specs)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in writer specs")
        self.shards = plan_shards(specs, max_shard_bytes)
        count = len(self.shards)
        self.shard_names = [
            shard_name(i, count, zero_based=zero_based_names, prefix=name_prefix)
            for i in range(count)
        ]
        self.slots: dict[str, _Slot] = {}
        self.weight_map: dict[str, str] = {}
        self._files: list[BinaryIO] = []
        for i, shard in enumerate(self.shards):
            # Largest itemsize first keeps every tensor aligned to its dtype, as the
            # safetensors serializer does; otherwise keep the caller's order.
            layout = sorted(shard, key=lambda s: -itemsize(s.dtype))
            header: dict[str, object] = {}
            if metadata:
                header["__metadata__"] = dict(metadata)
            offset = 0
            for spec in layout:
                header[spec.name] = {
                    "dtype": spec.dtype,
                    "shape": list(spec.shape),
                    "data_offsets": [offset, offset + spec.nbytes],
                }
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)
            data_start = 8 + len(raw)
            path = self.out_dir / self.shard_names[i]
            f = open(path, "wb")  # noqa: SIM115 - closed in close()
            self._files.append(f)
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(data_start + offset)
            for spec in layout:
                begin = header[spec.name]["data_offsets"][0]  # type: ignore[index]
                self.slots[spec.name] = _Slot(i, data_start + begin, spec.nbytes)
                self.weight_map[spec.name] = self.shard_names[i]
        self.total_size = sum(s.nbytes for s in specs)

    def write(self, name: str, data: np.ndarray) -> None:
        """Append `data` (whole tensor or the next rows of it) to tensor `name`."""
        slot = self.slots[name]
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if slot.written + raw.nbytes > slot.nbytes:
            raise ValueError(f"{name}: writing {raw.nbytes} bytes overruns its {slot.nbytes}")
        f = self._files[slot.shard]
        f.seek(slot.offset + slot.written)
        f.write(memoryview(raw))
        slot.written += raw.nbytes

    def close(self) -> None:
        incomplete = [n for n, s in self.slots.items() if s.written != s.nbytes]
        for f in self._files:
            f.close()
        self._files.clear()
        if incomplete:
            raise ValueError(f"tensors not fully written: {incomplete[:5]}")
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        write_json(self.out_dir / INDEX_NAME, index)

    def abort(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def copy_tensor(
    src: Checkpoint,
    writer: ShardedWriter,
    name: str,
    progress: Callable[[int], object] | None = None,
) -> None:
    """Copy tensor `name` bit for bit from `src` into `writer`, CHUNK_BYTES at a time;
    `progress(nbytes)` is called after each chunk (e.g. a tqdm bar's update)."""
    for chunk in src.iter_rows(name):
        writer.write(name, chunk)
        if progress is not None:
            progress(chunk.nbytes)
