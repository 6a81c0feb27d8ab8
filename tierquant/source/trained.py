"""The trained tiny gpt-oss: the committed asset tierquant/assets/tiny/ into a checkpoint.

`tierquant.source.train` (run by hand, never by the pipeline) trained it and wrote the
asset: a one-shard safetensors checkpoint in the original layout (MXFP4 expert blocks
and E8M0 scales, everything else bf16), the config.json it was trained under and the
tokenizer files it was trained with. The download stage (model=tiny, `weights:
trained`) writes it into data/original exactly as the synthetic generator lays out a
checkpoint: the same config keys, zero-based shard names and sizes from
`max_shard_bytes`, the index and the generation config. The bytes are the asset's, so
every machine writes the same data/original.
"""

from __future__ import annotations

import dataclasses
import logging
from importlib import resources
from pathlib import Path

from tierquant.core.checkpoint import Checkpoint, ShardedWriter, copy_tensor
from tierquant.core.files import read_json, write_json
from tierquant.core.gptoss import GptOssShape, hf_tensor_specs
from tierquant.errors import TierquantError
from tierquant.source.synthetic import SyntheticSpec, config_json, generation_config_json

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def asset_dir() -> Path:
    """tierquant/assets/tiny inside the installed package."""
    return Path(str(resources.files("tierquant").joinpath("assets/tiny")))


def check_shape(spec: SyntheticSpec, asset: Path) -> None:
    """The trained weights exist for one shape only: `spec` must be it."""
    want = read_json(asset / "config.json")
    got = config_json(spec)
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
        key = diff[0]
        # the param that decides it: a model.synthetic field of the same name, if any
        param = key if key in dataclasses.asdict(spec) else f"(config.json) {key}"
        raise TierquantError(
            f"params: model.synthetic.{param} is {got.get(key)!r}, but the trained tiny "
            f"model in {asset} has {want.get(key)!r}; set model.synthetic.weights: "
            "random for other shapes (or retrain: python -m tierquant.source.train)"
        )


def write_trained_checkpoint(out_dir: Path, spec: SyntheticSpec, asset: Path | None = None) -> None:
    """Write the trained tiny checkpoint into the existing directory `out_dir`."""
    out_dir = Path(out_dir)
    asset = asset_dir() if asset is None else Path(asset)
    check_shape(spec, asset)
    for name in TOKENIZER_FILES:
        (out_dir / name).write_bytes((asset / name).read_bytes())
    write_json(out_dir / "config.json", config_json(spec))
    write_json(out_dir / "generation_config.json", generation_config_json(spec))
    specs = hf_tensor_specs(GptOssShape.from_config(config_json(spec), "model.synthetic"))
    with Checkpoint(asset) as src:
        have = {name: src.info(name).spec for name in src.tensors}
        if have != {s.name: s for s in specs}:
            raise TierquantError(f"{asset}: the tensors differ from the config's layout")
        log.info("writing the trained tiny gpt-oss from %s", asset)
        with ShardedWriter(
            out_dir,
            specs,
            max_shard_bytes=spec.max_shard_bytes,
            zero_based_names=True,
            metadata={"format": "pt"},
        ) as writer:
            for s in specs:
                copy_tensor(src, writer, s.name)
