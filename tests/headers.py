"""Header-only gpt-oss checkpoints: real safetensors headers, sparse (free) data."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from tierquant.config import SyntheticSpec
from tierquant.core.checkpoint import INDEX_NAME, plan_shards, shard_name
from tierquant.core.files import write_json
from tierquant.core.gptoss import GptOssShape, hf_tensor_specs
from tierquant.source.synthetic import config_json

REAL_SIZES = {
    "gpt-oss-120b": {"num_hidden_layers": 36, "num_local_experts": 128},
    "gpt-oss-20b": {"num_hidden_layers": 24, "num_local_experts": 32},
}


def real_spec(model: str) -> SyntheticSpec:
    """The sizes of openai/gpt-oss-120b or -20b (docs/gpt-oss-format.md) as a SyntheticSpec."""
    return SyntheticSpec(
        num_experts_per_tok=4,
        hidden_size=2880,
        intermediate_size=2880,
        head_dim=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        sliding_window=128,
        vocab_size=201088,
        num_regular_tokens=199998,
        **REAL_SIZES[model],
    )


def write_header_only_checkpoint(root: Path, spec: SyntheticSpec) -> Path:
    """config.json, index and zero-based shards whose data is a hole (sparse file).

    The headers are exactly what a real checkpoint of these sizes holds; the reader
    checks the file size, which `os.truncate` sets without writing (or storing) data.
    """
    root.mkdir(parents=True, exist_ok=True)
    config = config_json(spec)
    write_json(root / "config.json", config)
    specs = hf_tensor_specs(GptOssShape.from_config(config))
    shards = plan_shards(specs, 4_800_000_000)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        name = shard_name(i, len(shards), zero_based=True)
        header, offset = {}, 0
        for s in shard:
            header[s.name] = {
                "dtype": s.dtype,
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            weight_map[s.name] = name
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = root / name
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
        os.truncate(path, 8 + len(raw) + offset)
        total += offset
    write_json(root / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return root
