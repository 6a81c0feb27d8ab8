"""Where the quantize stage's time goes, and its speed against mlx-lm's way, same run.

Writes one expert stack of gpt-oss-120b's shape ([E, 2880, 2880], E experts of random
MXFP4 codes and scales) to an original checkpoint in a scratch folder, and its bf16
decode to a float checkpoint (what convert writes), then on them:

  profile    the stage's loop one slice at a time on one stream, each phase timed:
             read (the original's MXFP4 rows -> numpy), decode (convert's decoder,
             straight into MLX's memory), mx.quantize, the error sample (every 16th row
             dequantized and compared), write (numpy views -> the shard)
  ours x1    tierquant.build.quantize.quantize_tier with one stream (slices in order)
  ours       quantize_tier as the stage runs it: slices spread over slice_streams()
             (one per core on the CPU), reads and writes overlapping the work
  mlx-lm     what `mlx_lm.convert -q` does per tensor of the float checkpoint: mx.load
             (lazy), mx.quantize of the whole tensor, mx.save_safetensors

and prints GB/s of bf16 in for each, and ours / mlx-lm. Outputs of ours x1 and ours are
checked byte-identical.

    python bench/quantize.py --experts 32 --workdir /big/scratch
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from common import scratch_dir


def write_checkpoints(original: Path, float_dir: Path, experts: int, name: str) -> None:
    """The stack's MXFP4 in `original` (gpt-oss names), its bf16 decode in `float_dir`
    (mlx-lm names, as convert writes it), plus the config.json of a one-layer gpt-oss
    with `experts` experts at gpt-oss-120b's widths (what quantize_tier reads shapes from)."""
    from dataclasses import replace

    from tierquant.config import compose, validate
    from tierquant.core.checkpoint import ShardedWriter, TensorSpec
    from tierquant.core.files import write_json
    from tierquant.core.mxfp4 import dequantize_to_bf16_bits
    from tierquant.source.synthetic import config_json

    wide = validate(compose(["model=wide"])).model.synthetic
    config = config_json(replace(wide, num_hidden_layers=1, num_local_experts=experts))
    prefix = "model.layers.0.mlp.experts.down_proj"
    specs = [
        TensorSpec(f"{prefix}_blocks", "U8", (experts, 2880, 90, 16)),
        TensorSpec(f"{prefix}_scales", "U8", (experts, 2880, 90)),
    ]
    rng = np.random.default_rng(0)
    for folder in (original, float_dir):
        folder.mkdir(parents=True)
        write_json(folder / "config.json", config)
    with (
        ShardedWriter(original, specs, max_shard_bytes=1 << 40, metadata={}) as mx4,
        ShardedWriter(
            float_dir,
            [TensorSpec(name, "BF16", (experts, 2880, 2880))],
            max_shard_bytes=1 << 40,
            metadata={},
        ) as bf16,
    ):
        for _ in range(experts):
            blocks = rng.integers(0, 256, (1, 2880, 90, 16), dtype=np.uint8)
            scales = rng.integers(118, 124, (1, 2880, 90), dtype=np.uint8)
            mx4.write(specs[0].name, blocks)
            mx4.write(specs[1].name, scales)
            bf16.write(name, dequantize_to_bf16_bits(blocks, scales))


def profile(original: Path, name: str, bits: int) -> dict[str, float]:
    import mlx.core as mx

    from tierquant.build.manifest import ERROR_ROW_STRIDE
    from tierquant.core.affine import SliceRing, slices
    from tierquant.core.checkpoint import Checkpoint
    from tierquant.core.floatrows import mxfp4_source
    from tierquant.core.gptoss import mlx_weights, shape_of_checkpoint
    from tierquant.core.mxfp4 import dequantize_to_bf16_bits

    weight = next(w for w in mlx_weights(shape_of_checkpoint(original)) if w.name == name)
    blocks_name, scales_name, _ = mxfp4_source(weight)
    phases = dict.fromkeys(("read", "decode into MLX", "mx.quantize", "error sample", "write"), 0.0)
    sink = open(original / "profile.bin", "wb")  # noqa: SIM115
    read: dict[str, np.ndarray] = {}
    ring = SliceRing(
        lambda start, stop, out: dequantize_to_bf16_bits(read["blocks"], read["scales"], out=out),
        weight.shape[1:],
        depth=1,  # each slice's work is evaluated before the next is read
    )
    with Checkpoint(original) as src:
        for start, stop in slices(weight.shape):
            t = time.perf_counter()
            read["blocks"] = src.read_rows(blocks_name, start, stop)
            read["scales"] = src.read_rows(scales_name, start, stop)
            phases["read"] += time.perf_counter() - t
            t = time.perf_counter()
            x = ring(start, stop)
            phases["decode into MLX"] += time.perf_counter() - t
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


def ours(
    original: Path, folder: Path, out: Path, name: str, bits: int, streams: int | None
) -> float:
    import mlx.core as mx

    import tierquant.build.quantize as q
    from tierquant.core.precision import parse_precision

    default = q.slice_streams
    if streams is not None:
        q.slice_streams = lambda: tuple(mx.new_stream(mx.default_device()) for _ in range(streams))
    try:
        t = time.perf_counter()
        q.quantize_tier(
            tier="experts",
            tensor_names=[name],
            precision=parse_precision(bits, "tiers.experts"),
            original_dir=original,
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


def check_same_bytes(ours_dir: Path, mlx_dir: Path, name: str) -> None:
    """Ours (from the MXFP4) and mlx-lm's way (from the float) wrote the same tensors."""
    from tierquant.core.checkpoint import Checkpoint

    module = name.removesuffix(".weight")
    with Checkpoint(ours_dir) as a, Checkpoint(mlx_dir) as b:
        for mine, theirs in (("weight", "w"), ("scales", "s"), ("biases", "b")):
            if not np.array_equal(a.read(f"{module}.{mine}"), b.read(theirs)):
                raise SystemExit(f"ours and mlx-lm's way differ in {mine}")


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
    from tierquant.core.affine import slice_streams

    work = scratch_dir("tq-bench-quantize-", args.workdir)
    name = "model.layers.0.mlp.experts.down_proj.weight"
    try:
        original, folder = work / "original", work / "float"
        write_checkpoints(original, folder, args.experts, name)
        gb = args.experts * 2880 * 2880 * 2 / 1e9
        print(
            f"{platform.platform()}: [{args.experts}, 2880, 2880] bf16 = {gb:.2f} GB, "
            f"{args.bits}-bit g64, {len(slice_streams())} streams by default"
        )
        phases = profile(original, name, args.bits)
        total = sum(phases.values())
        print(f"profile (one stream, in order): {total:.2f} s = {gb / total:.2f} GB/s")
        for phase, s in phases.items():
            print(f"  {phase:<13} {s:6.2f} s  {100 * s / total:4.0f}%")
        times = {}
        for label, streams in (("ours x1", 1), ("ours", None)):
            out = work / label.replace(" ", "")
            times[label] = ours(original, folder, out, name, args.bits, streams)
        assert digest(work / "oursx1") == digest(work / "ours"), "stream count changed bytes"
        times["mlx-lm"] = mlx_lm_way(folder, work / "mlx", name, args.bits)
        check_same_bytes(work / "ours", work / "mlx", name)
        for label, s in times.items():
            print(f"{label:>8}: {s:6.2f} s  {gb / s:.2f} GB/s")
        print(
            f"ours / mlx-lm wall: {times['ours'] / times['mlx-lm']:.2f}; "
            f"ours / ours x1: {times['ours'] / times['ours x1']:.2f} (outputs identical, "
            "and identical to mlx-lm's)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
