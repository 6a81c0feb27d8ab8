"""Where the quantize stage's time goes, and its speed against mlx-lm's way, same run.

Writes one bf16 expert stack of gpt-oss-120b's shape ([E, 2880, 2880], E experts of
random normal weights) to a float checkpoint in a scratch folder, then on it:

  profile    the stage's loop one slice at a time on one stream, each phase timed:
             read (safetensors rows -> numpy), to MLX (the copy into an mx.array),
             mx.quantize, the error sample (every 16th row dequantized and compared),
             write (numpy views -> the shard)
  ours x1    tierquant.quantize.quantize_tier with one stream (slices in order)
  ours       quantize_tier as the stage runs it: slices spread over slice_streams()
             (one per core on the CPU), reads and writes overlapping the work
  mlx-lm     what `mlx_lm.convert -q` does per tensor: mx.load (lazy), mx.quantize of
             the whole tensor, mx.save_safetensors

and prints GB/s of bf16 in for each, and ours / mlx-lm. Outputs of ours x1 and ours are
checked byte-identical.

    python bench/quantize.py --experts 32 --workdir /big/scratch
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_float(folder: Path, experts: int, name: str) -> None:
    """The tensor, plus the config.json of a one-layer gpt-oss with `experts` experts at
    gpt-oss-120b's widths (what quantize_tier reads the tensor's shape from)."""
    from dataclasses import replace

    from tierquant.checkpoint import ShardedWriter, TensorSpec
    from tierquant.config import compose, validate
    from tierquant.files import write_json
    from tierquant.synthetic import config_json

    folder.mkdir(parents=True)
    wide = validate(compose(["model=wide"])).model.synthetic
    write_json(
        folder / "config.json",
        config_json(replace(wide, num_hidden_layers=1, num_local_experts=experts)),
    )
    rng = np.random.default_rng(0)
    shape = (experts, 2880, 2880)
    with ShardedWriter(
        folder, [TensorSpec(name, "BF16", shape)], max_shard_bytes=1 << 40, metadata={}
    ) as w:
        for _ in range(experts):
            x = rng.standard_normal((1, 2880, 2880), dtype=np.float32) * 0.02
            w.write(name, (x.view(np.uint32) >> 16).astype(np.uint16))


def profile(folder: Path, name: str, bits: int) -> dict[str, float]:
    import mlx.core as mx

    from tierquant.affine import SLICE_BYTES
    from tierquant.checkpoint import Checkpoint
    from tierquant.quantize import ERROR_ROW_STRIDE

    phases = dict.fromkeys(("read", "to MLX", "mx.quantize", "error sample", "write"), 0.0)
    sink = open(folder / "profile.bin", "wb")  # noqa: SIM115
    with Checkpoint(folder) as src:
        rows = iter(src.iter_rows(name, SLICE_BYTES))
        while True:
            t = time.perf_counter()
            raw = next(rows, None)
            if raw is None:
                break
            phases["read"] += time.perf_counter() - t
            t = time.perf_counter()
            x = mx.array(raw).view(mx.bfloat16)
            mx.eval(x)
            phases["to MLX"] += time.perf_counter() - t
            t = time.perf_counter()
            wq, s, b = mx.quantize(x, group_size=64, bits=bits)
            mx.eval(wq, s, b)
            phases["mx.quantize"] += time.perf_counter() - t
            t = time.perf_counter()
            k = (..., slice(None, None, ERROR_ROW_STRIDE), slice(None))
            dq = mx.dequantize(wq[k], s[k], b[k], group_size=64, bits=bits)
            x32 = x[k].astype(mx.float32)
            d = dq.astype(mx.float32) - x32
            e, r = mx.sum(d * d), mx.sum(x32 * x32)
            mx.eval(e, r)
            phases["error sample"] += time.perf_counter() - t
            t = time.perf_counter()
            for a in (wq, s.view(mx.uint16), b.view(mx.uint16)):
                sink.write(memoryview(np.array(a, copy=False)))
            phases["write"] += time.perf_counter() - t
    sink.close()
    return phases


def ours(folder: Path, out: Path, name: str, bits: int, streams: int | None) -> float:
    import mlx.core as mx

    import tierquant.quantize as q
    from tierquant.precision import parse_precision

    default = q.slice_streams
    if streams is not None:
        q.slice_streams = lambda: tuple(mx.new_stream(mx.default_device()) for _ in range(streams))
    try:
        t = time.perf_counter()
        q.quantize_tier(
            tier="experts",
            tensor_names=[name],
            precision=parse_precision(bits, "tiers.experts"),
            float_dir=folder,
            original_dir=folder,
            out_dir=out,
            max_shard_bytes=1 << 40,
        )
        return time.perf_counter() - t
    finally:
        q.slice_streams = default


def mlx_lm_way(folder: Path, out: Path, name: str, bits: int) -> float:
    import mlx.core as mx

    t = time.perf_counter()
    shard = next(folder.glob("*.safetensors"))
    w = mx.load(str(shard))[name]
    wq, s, b = mx.quantize(w, group_size=64, bits=bits)
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), {"w": wq, "s": s, "b": b})
    return time.perf_counter() - t


def digest(folder: Path) -> str:
    h = hashlib.md5()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32, help="experts in the stack (32)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from tierquant.affine import slice_streams

    work = Path(tempfile.mkdtemp(prefix="tq-bench-quantize-", dir=args.workdir))
    name = "model.layers.0.mlp.experts.down_proj.weight"
    try:
        folder = work / "float"
        write_float(folder, args.experts, name)
        gb = args.experts * 2880 * 2880 * 2 / 1e9
        print(
            f"{platform.platform()}: [{args.experts}, 2880, 2880] bf16 = {gb:.2f} GB, "
            f"{args.bits}-bit g64, {len(slice_streams())} streams by default"
        )
        phases = profile(folder, name, args.bits)
        total = sum(phases.values())
        print(f"profile (one stream, in order): {total:.2f} s = {gb / total:.2f} GB/s")
        for phase, s in phases.items():
            print(f"  {phase:<13} {s:6.2f} s  {100 * s / total:4.0f}%")
        times = {}
        for label, streams in (("ours x1", 1), ("ours", None)):
            out = work / label.replace(" ", "")
            times[label] = ours(folder, out, name, args.bits, streams)
        assert digest(work / "oursx1") == digest(work / "ours"), "stream count changed bytes"
        times["mlx-lm"] = mlx_lm_way(folder, work / "mlx", name, args.bits)
        for label, s in times.items():
            print(f"{label:>8}: {s:6.2f} s  {gb / s:.2f} GB/s")
        print(
            f"ours / mlx-lm wall: {times['ours'] / times['mlx-lm']:.2f}; "
            f"ours / ours x1: {times['ours'] / times['ours x1']:.2f} (outputs identical)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
