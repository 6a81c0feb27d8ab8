"""The gpt-oss architecture as files: config keys, HF tensor names and shapes.

One place for what docs/gpt-oss-format.md says about the checkpoint layout, used to
synthesize checkpoints, to verify downloads and to map names for conversion.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tierquant.core.checkpoint import Checkpoint, TensorSpec
from tierquant.core.files import read_json
from tierquant.core.mxfp4 import (
    GROUP_SIZE as MXFP4_BLOCK,  # values per MXFP4 block (16 bytes + 1 scale)
)
from tierquant.errors import TierquantError

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class GptOssShape:
    """The sizes that determine every tensor of a gpt-oss checkpoint."""

    num_hidden_layers: int
    num_local_experts: int
    num_experts_per_tok: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    sliding_window: int
    layer_types: tuple[str, ...]

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> GptOssShape:
        """Read the shape from a config.json dict; a missing or bad key names itself."""
        values = {}
        for key in (
            "num_hidden_layers",
            "num_local_experts",
            "num_experts_per_tok",
            "hidden_size",
            "intermediate_size",
            "head_dim",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "sliding_window",
        ):
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise TierquantError(f"{source}: key {key!r} must be a positive int, got {value!r}")
            values[key] = value
        layer_types = config.get("layer_types")
        if layer_types is None:
            layer_types = [LAYER_TYPES[i % 2] for i in range(values["num_hidden_layers"])]
        if len(layer_types) != values["num_hidden_layers"] or any(
            t not in LAYER_TYPES for t in layer_types
        ):
            raise TierquantError(
                f"{source}: 'layer_types' must list {values['num_hidden_layers']} entries "
                f"(num_hidden_layers), each one of {LAYER_TYPES}"
            )
        if values["hidden_size"] % MXFP4_BLOCK or values["intermediate_size"] % MXFP4_BLOCK:
            raise TierquantError(
                f"{source}: hidden_size and intermediate_size must be multiples of {MXFP4_BLOCK}"
            )
        return cls(layer_types=tuple(layer_types), **values)

    @property
    def q_out(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.num_key_value_heads * self.head_dim


def hf_layer_specs(shape: GptOssShape, layer: int) -> list[TensorSpec]:
    """The 19 tensors of one layer in the HF (original, MXFP4) layout."""
    p = f"model.layers.{layer}"
    h, e = shape.hidden_size, shape.num_local_experts
    i2 = 2 * shape.intermediate_size
    return [
        TensorSpec(f"{p}.input_layernorm.weight", "BF16", (h,)),
        TensorSpec(f"{p}.post_attention_layernorm.weight", "BF16", (h,)),
        TensorSpec(f"{p}.self_attn.q_proj.weight", "BF16", (shape.q_out, h)),
        TensorSpec(f"{p}.self_attn.q_proj.bias", "BF16", (shape.q_out,)),
        TensorSpec(f"{p}.self_attn.k_proj.weight", "BF16", (shape.kv_out, h)),
        TensorSpec(f"{p}.self_attn.k_proj.bias", "BF16", (shape.kv_out,)),
        TensorSpec(f"{p}.self_attn.v_proj.weight", "BF16", (shape.kv_out, h)),
        TensorSpec(f"{p}.self_attn.v_proj.bias", "BF16", (shape.kv_out,)),
        TensorSpec(f"{p}.self_attn.o_proj.weight", "BF16", (h, shape.q_out)),
        TensorSpec(f"{p}.self_attn.o_proj.bias", "BF16", (h,)),
        TensorSpec(f"{p}.self_attn.sinks", "BF16", (shape.num_attention_heads,)),
        TensorSpec(f"{p}.mlp.router.weight", "BF16", (e, h)),
        TensorSpec(f"{p}.mlp.router.bias", "BF16", (e,)),
        TensorSpec(
            f"{p}.mlp.experts.gate_up_proj_blocks",
            "U8",
            (e, i2, h // MXFP4_BLOCK, MXFP4_BLOCK // 2),
        ),
        TensorSpec(f"{p}.mlp.experts.gate_up_proj_scales", "U8", (e, i2, h // MXFP4_BLOCK)),
        TensorSpec(f"{p}.mlp.experts.gate_up_proj_bias", "BF16", (e, i2)),
        TensorSpec(
            f"{p}.mlp.experts.down_proj_blocks",
            "U8",
            (e, h, shape.intermediate_size // MXFP4_BLOCK, MXFP4_BLOCK // 2),
        ),
        TensorSpec(
            f"{p}.mlp.experts.down_proj_scales",
            "U8",
            (e, h, shape.intermediate_size // MXFP4_BLOCK),
        ),
        TensorSpec(f"{p}.mlp.experts.down_proj_bias", "BF16", (e, h)),
    ]


def hf_tensor_specs(shape: GptOssShape) -> list[TensorSpec]:
    """Every tensor of the original checkpoint, in checkpoint order."""
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (shape.vocab_size, shape.hidden_size))]
    for layer in range(shape.num_hidden_layers):
        specs += hf_layer_specs(shape, layer)
    specs += [
        TensorSpec("model.norm.weight", "BF16", (shape.hidden_size,)),
        TensorSpec("lm_head.weight", "BF16", (shape.vocab_size, shape.hidden_size)),
    ]
    return specs


# The files that travel with the weights, in every checkpoint this project reads or writes
# (the original, data/float, data/model): the one list of them. config.json is rewritten
# by convert and assemble; the others are copied unchanged (`copy_side_files`).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def copy_side_files(src: Path, dest: Path) -> list[str]:
    """Copy every side file but config.json present in `src` into `dest`; their names."""
    copied = []
    for name in SIDE_FILES:
        if name != "config.json" and (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dest) / name)
            copied.append(name)
    return copied


def verify_side_files(root: Path) -> None:
    """Each JSON side file present parses as an object and tokenizer.json loads as a
    tokenizer (with the `tokenizers` library, which mlx-lm's loader uses), naming the file
    that does not: better at download than in the reference or benchmark stage."""
    for name in SIDE_FILES:
        path = Path(root) / name
        if name.endswith(".json") and path.is_file() and not isinstance(read_json(path), dict):
            raise TierquantError(f"{path}: is not a JSON object")
    path = Path(root) / "tokenizer.json"
    if not path.is_file():
        return
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - installed with mlx-lm
        return
    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust parser raises a bare Exception
        raise TierquantError(f"{path}: does not load as a tokenizer ({e})") from e


def check_headers(root: Path) -> Checkpoint:
    """The checkpoint at `root`, every tensor it holds checked against the dtype and
    shape its config.json implies (headers only): a config that does not match the
    weights (say a wrong num_local_experts) is named as such, not found later as a short
    read. Tensors the config implies but the checkpoint lacks are `verify_original`'s."""
    root = Path(root)
    ckpt = Checkpoint(root)
    config_path = root / "config.json"
    shape = GptOssShape.from_config(ckpt.config, str(config_path))
    expected = {s.name: s for s in hf_tensor_specs(shape)}
    for name, got in ckpt.tensors.items():
        spec = expected.get(name)
        if spec is not None and (got.dtype, got.shape) != (spec.dtype, spec.shape):
            ckpt.close()
            raise TierquantError(
                f"{got.path}: tensor {name!r} is {got.dtype}{list(got.shape)} but "
                f"{config_path.name} implies {spec.dtype}{list(spec.shape)}"
            )
    return ckpt


def verify_original(root: Path) -> Checkpoint:
    """Check a downloaded/synthesized original checkpoint against its config.json.

    Every shard named by the index exists, every header parses, and every tensor the
    config implies is present with the right shape and dtype (and nothing else); the
    JSON side files and the tokenizer parse (`verify_side_files`).
    """
    root = Path(root)
    verify_side_files(root)
    ckpt = check_headers(root)
    config_path = root / "config.json"
    shape = GptOssShape.from_config(ckpt.config, str(config_path))
    expected = {s.name: s for s in hf_tensor_specs(shape)}
    for name, spec in expected.items():
        if name not in ckpt.tensors:
            raise TierquantError(
                f"{root}: tensor {name!r} ({spec.dtype}{list(spec.shape)}), implied by "
                f"{config_path.name}, is missing"
            )
    extra = sorted(set(ckpt.tensors) - set(expected))
    if extra:
        raise TierquantError(
            f"{ckpt.tensors[extra[0]].path}: tensor {extra[0]!r} is not part of a gpt-oss "
            f"checkpoint with num_hidden_layers={shape.num_hidden_layers} "
            f"({len(extra)} unexpected tensor(s)); does {config_path.name} match the weights?"
        )
    return ckpt


# --- mlx-lm side: the names mlx-lm's gpt_oss model uses after its sanitize ---------------

# What each tensor of the float checkpoint is, for recipes to select by.
MATRIX_KINDS = (
    "embed_tokens",
    "lm_head",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "router",
    "gate_proj",
    "up_proj",
    "down_proj",
)
VECTOR_KINDS = ("norm", "bias", "sinks")
KINDS = MATRIX_KINDS + VECTOR_KINDS
EXPERT_KINDS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Weight:
    """One tensor of the bf16 float checkpoint (mlx-lm names), as recipes see it.

    `module` is the mlx-lm module path that config.json's per-module `quantization`
    map is keyed by (the tensor name without `.weight`/`.bias`).
    """

    name: str
    kind: str
    layer: int | None
    layer_type: str | None
    shape: tuple[int, ...]

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def is_matrix(self) -> bool:
        return self.kind in MATRIX_KINDS

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def mlx_layer_weights(shape: GptOssShape, layer: int) -> list[Weight]:
    """The bf16 tensors of one layer in mlx-lm names (experts as [E, out, in])."""
    p = f"model.layers.{layer}"
    h, e, i = shape.hidden_size, shape.num_local_experts, shape.intermediate_size
    lt = shape.layer_types[layer]

    def w(name: str, kind: str, dims: tuple[int, ...]) -> Weight:
        return Weight(f"{p}.{name}", kind, layer, lt, dims)

    return [
        w("input_layernorm.weight", "norm", (h,)),
        w("post_attention_layernorm.weight", "norm", (h,)),
        w("self_attn.q_proj.weight", "q_proj", (shape.q_out, h)),
        w("self_attn.q_proj.bias", "bias", (shape.q_out,)),
        w("self_attn.k_proj.weight", "k_proj", (shape.kv_out, h)),
        w("self_attn.k_proj.bias", "bias", (shape.kv_out,)),
        w("self_attn.v_proj.weight", "v_proj", (shape.kv_out, h)),
        w("self_attn.v_proj.bias", "bias", (shape.kv_out,)),
        w("self_attn.o_proj.weight", "o_proj", (h, shape.q_out)),
        w("self_attn.o_proj.bias", "bias", (h,)),
        w("self_attn.sinks", "sinks", (shape.num_attention_heads,)),
        w("mlp.router.weight", "router", (e, h)),
        w("mlp.router.bias", "bias", (e,)),
        w("mlp.experts.gate_proj.weight", "gate_proj", (e, i, h)),
        w("mlp.experts.gate_proj.bias", "bias", (e, i)),
        w("mlp.experts.up_proj.weight", "up_proj", (e, i, h)),
        w("mlp.experts.up_proj.bias", "bias", (e, i)),
        w("mlp.experts.down_proj.weight", "down_proj", (e, h, i)),
        w("mlp.experts.down_proj.bias", "bias", (e, h)),
    ]


def mlx_weights(shape: GptOssShape) -> list[Weight]:
    """Every tensor of the bf16 float checkpoint, in checkpoint order."""
    v, h = shape.vocab_size, shape.hidden_size
    weights = [Weight("model.embed_tokens.weight", "embed_tokens", None, None, (v, h))]
    for layer in range(shape.num_hidden_layers):
        weights += mlx_layer_weights(shape, layer)
    weights += [
        Weight("model.norm.weight", "norm", None, None, (h,)),
        Weight("lm_head.weight", "lm_head", None, None, (v, h)),
    ]
    return weights


def mlx_float_specs(shape: GptOssShape) -> list[TensorSpec]:
    """The float checkpoint's tensors: every weight above as BF16."""
    return [TensorSpec(w.name, "BF16", w.shape) for w in mlx_weights(shape)]


def shape_of_checkpoint(root: Path) -> GptOssShape:
    """The GptOssShape of a checkpoint directory, from its config.json."""

    path = Path(root) / "config.json"
    return GptOssShape.from_config(read_json(path), str(path))
