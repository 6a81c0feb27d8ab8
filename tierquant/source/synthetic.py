"""A synthetic gpt-oss checkpoint of any shape, in the exact HF layout of the release.

Same tensor names, dtypes, MXFP4 packing with interleaved gate/up rows, config keys,
zero-based shard names, index, tokenizer and generation files as openai/gpt-oss-120b;
only the sizes differ. Deterministic: every tensor (and every expert slice) draws from
its own generator seeded by (seed, tensor name), so output bytes do not depend on the
order or size of the pieces it is generated in.

So that quantization damage is measurable, the tiny model is made to behave like a
small trained language model rather than noise: with `fit_to_corpus`, the embedding
and lm_head are the two halves of a low-rank factorisation of the corpus' bigram
log-probabilities (so each next-token distribution is peaked and text-like), and
every attention and MoE block adds a random but substantial update to the residual
stream (about `BLOCK_GAIN` of its norm), so changing any of those weights moves the
output distribution. Without `fit_to_corpus` (the wide model, whose 201088-row fit is not
worth its time) the embedding and lm_head are random, and the lm_head is scaled so that
its logits reach TARGET_ENTROPY too: the next-token distributions are as peaked as the
tiny model's, not logits of standard deviation sqrt(hidden_size) (~54 at 2880), under
which every KL divergence between two quantizations is tens of nats of noise.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tierquant.core.checkpoint import ShardedWriter, TensorSpec
from tierquant.core.files import write_json
from tierquant.core.gptoss import GptOssShape, hf_tensor_specs
from tierquant.core.mxfp4 import FP4_VALUES, to_bf16_bits
from tierquant.errors import TierquantError
from tierquant.quality.evalset import load_corpus
from tierquant.source.tokenizer import build_tokenizer_files, special_token_ids

log = logging.getLogger(__name__)


@dataclass
class SyntheticSpec:
    """Shape and seed of a synthetic gpt-oss checkpoint (params: model.synthetic)."""

    seed: int = 0
    num_hidden_layers: int = 6
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    hidden_size: int = 128
    intermediate_size: int = 128
    head_dim: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    sliding_window: int = 32
    vocab_size: int = 1024
    num_regular_tokens: int = 1000
    max_shard_bytes: int = 1_000_000
    fit_to_corpus: bool = True
    # "random": this module generates the weights (any shape); "trained": the committed
    # trained tiny model (tierquant/assets/tiny, one shape only: tierquant.source.trained)
    weights: str = "random"


SYNTHETIC_WEIGHTS = ("random", "trained")


BLOCK_GAIN = 0.1  # each attention / MoE block's output RMS relative to the residual's
TARGET_ENTROPY = 1.0  # nats: mean next-token entropy of the embedding→lm_head path
ROUTER_LOGIT_RMS = 2.0  # spread of router logits: larger means more decisive routing
FP4_CODE_STD = 2.0  # spread of the FP4 codes drawn for expert weights, in FP4 units


def shape_of(spec: SyntheticSpec) -> GptOssShape:
    return GptOssShape.from_config(config_json(spec), "model.synthetic")


def config_json(spec: SyntheticSpec) -> dict:
    """config.json with every key the real gpt-oss-120b config has, sizes from `spec`."""
    ids = special_token_ids(spec.num_regular_tokens)
    layers = spec.num_hidden_layers
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": ids["<|return|>"],
        "experts_per_token": spec.num_experts_per_tok,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "layer_types": [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ],
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": spec.num_attention_heads,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "num_hidden_layers": layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "num_local_experts": spec.num_local_experts,
        "output_router_logits": False,
        "pad_token_id": ids["<|endoftext|>"],
        "quantization_config": {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": spec.sliding_window,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }


def generation_config_json(spec: SyntheticSpec) -> dict:
    ids = special_token_ids(spec.num_regular_tokens)
    return {
        "bos_token_id": ids["<|startoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "transformers_version": "4.55.0.dev0",
    }


def _rng(seed: int, name: str, part: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), part])


def _temperature_for_entropy(logits: np.ndarray, *, hi: float, steps: int) -> float:
    """The factor t in [0.01, hi] for which softmax(t * logits) has mean entropy
    TARGET_ENTROPY over the rows of `logits` (geometric bisection, `steps` halvings)."""
    lo = 0.01
    for _ in range(steps):
        mid = np.sqrt(lo * hi)
        z = logits * mid
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        entropy = -(p * np.log(p + 1e-30)).sum(axis=1).mean()
        lo, hi = (mid, hi) if entropy > TARGET_ENTROPY else (lo, mid)
    return np.sqrt(lo * hi)


class _Weights:
    """Generates each tensor of the checkpoint from its name."""

    def __init__(self, spec: SyntheticSpec, shape: GptOssShape, corpus_ids: list[int] | None):
        self.spec = spec
        self.shape = shape
        self.embed, self.lm_head = self._vocab_matrices(corpus_ids)
        # Byte LUT for expert weights: a uniform uint16 picks a byte whose two FP4 nibbles
        # are independent draws from a discretised normal (std FP4_CODE_STD).
        values = np.array(FP4_VALUES)
        p = np.exp(-0.5 * (values / FP4_CODE_STD) ** 2)
        p[8] = 0.0  # -0 duplicates +0
        p /= p.sum()
        pair = np.outer(p, p).reshape(-1)  # index hi * 16 + lo
        cdf = np.cumsum(pair)
        cdf[-1] = 1.0
        u = (np.arange(65536) + 0.5) / 65536
        idx = np.searchsorted(cdf, u)
        hi, lo = idx // 16, idx % 16
        self.byte_lut = (hi * 16 + lo).astype(np.uint8)
        self.code_std = float(np.sqrt((p * values**2).sum()))

    def _vocab_matrices(self, corpus_ids: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
        v, h = self.shape.vocab_size, self.shape.hidden_size
        if corpus_ids is None:
            return None, None  # generated row-block by row-block in tensor()
        counts = np.zeros((v, v))
        ids = np.asarray(corpus_ids)
        np.add.at(counts, (ids[:-1], ids[1:]), 1.0)
        n_regular = self.spec.num_regular_tokens
        prior = np.full(v, 1e-4)
        prior[:n_regular] += np.bincount(ids, minlength=v)[:n_regular]
        prior /= prior.sum()
        probs = counts + 0.5 * prior[None, :] * 50
        probs /= probs.sum(axis=1, keepdims=True)
        target = np.log(probs)
        target -= target.mean(axis=1, keepdims=True)
        u, s, vt = np.linalg.svd(target, full_matrices=False)
        # A singular vector's sign is arbitrary, and which one LAPACK returns depends on
        # the BLAS kernel the CPU selects: fix it (the largest entry of each left vector
        # positive), so every machine writes the same bytes and the DVC cache hits.
        signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
        u, vt = u * signs, vt * signs[:, None]
        rank = min(h, len(s))
        root = np.sqrt(s[:rank])
        embed = np.zeros((v, h))
        head = np.zeros((v, h))
        embed[:, :rank] = u[:, :rank] * root
        head[:, :rank] = vt[:rank].T * root
        # Unit RMS embedding rows: the residual stream starts at a known scale.
        embed /= np.sqrt((embed**2).mean(axis=1, keepdims=True)) + 1e-12
        # The final RMSNorm sees unit-RMS rows too; pick the temperature that gives
        # TARGET_ENTROPY on average over the corpus' tokens.
        seen = np.unique(ids)
        temperature = _temperature_for_entropy(embed[seen] @ head.T, hi=100.0, steps=50)
        return embed.astype(np.float32), (head * temperature).astype(np.float32)

    def random_head_scale(self) -> float:
        """Std of a random lm_head's entries for which the logits of a unit-RMS final
        hidden state (std = scale * sqrt(hidden)) have mean entropy TARGET_ENTROPY,
        solved on ~2M standard normal logits."""
        v, h = self.shape.vocab_size, self.shape.hidden_size
        rows = max(4, (1 << 21) // v)  # ~2M logits: a stable mean at any vocabulary size
        z = _rng(self.spec.seed, "lm_head temperature").standard_normal((rows, v))
        return float(_temperature_for_entropy(z, hi=1000.0, steps=60) / np.sqrt(h))

    def bf16(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        s = self.shape
        rng = _rng(self.spec.seed, name)
        leaf = name.rsplit(".", 1)[-1]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            fitted = self.embed if name.startswith("model") else self.lm_head
            return to_bf16_bits(fitted)
        if "layernorm" in name or name == "model.norm.weight":
            x = 1.0 + 0.05 * rng.standard_normal(shape)
        elif leaf == "sinks":
            x = rng.standard_normal(shape)
        elif leaf == "bias" or name.endswith("_bias"):
            x = 0.02 * rng.standard_normal(shape)
        elif "router" in name:  # decisive routing: few near-ties between experts
            x = rng.standard_normal(shape) * (ROUTER_LOGIT_RMS / np.sqrt(s.hidden_size))
        elif "o_proj" in name:  # attention output of RMS ~BLOCK_GAIN
            x = rng.standard_normal(shape) * (BLOCK_GAIN * 2 / np.sqrt(shape[1]))
        else:  # q, k, v: unit-variance projections of the normed input
            x = rng.standard_normal(shape) / np.sqrt(shape[1])
        return to_bf16_bits(x.astype(np.float32))

    def parts(self, spec: TensorSpec) -> Iterator[np.ndarray]:
        """The tensor's bytes in pieces of bounded size, in order."""
        if spec.dtype == "U8":
            yield from self.expert_slices(spec)
        elif spec.name in ("model.embed_tokens.weight", "lm_head.weight") and self.embed is None:
            scale = np.float32(1.0 if spec.name.startswith("model") else self.random_head_scale())
            rows = max(1, (64 << 20) // (4 * spec.shape[1]))
            for part, start in enumerate(range(0, spec.shape[0], rows)):
                n = min(rows, spec.shape[0] - start)
                rng = _rng(self.spec.seed, spec.name, part)
                x = rng.standard_normal((n, spec.shape[1]), dtype=np.float32)
                yield to_bf16_bits(x * scale)
        else:
            yield self.bf16(spec.name, spec.shape)

    def expert_slices(self, spec: TensorSpec) -> Iterator[np.ndarray]:
        """MXFP4 blocks or scales of one expert at a time."""
        s = self.shape
        down = ".down_proj_" in spec.name
        fan_in = s.intermediate_size if down else s.hidden_size
        # gate/up pre-activations of RMS ~1.5; down scaled for an MoE output of ~BLOCK_GAIN
        target_std = (BLOCK_GAIN * 4 if down else 1.5) / np.sqrt(fan_in)
        exponent = 127 + int(np.round(np.log2(target_std / self.code_std)))
        for e in range(spec.shape[0]):
            rng = _rng(self.spec.seed, spec.name, e)
            if spec.name.endswith("_blocks"):
                draws = rng.integers(0, 65536, size=spec.shape[1:], dtype=np.uint16)
                yield self.byte_lut[draws]
            else:
                jitter = rng.integers(-1, 2, size=spec.shape[1:])
                yield (exponent + jitter).astype(np.uint8)


def write_synthetic_checkpoint(out_dir: Path, spec: SyntheticSpec) -> None:
    """Write the checkpoint described by `spec` into the existing directory `out_dir`."""
    out_dir = Path(out_dir)
    shape = shape_of(spec)
    if spec.vocab_size < spec.num_regular_tokens + 21:
        raise TierquantError(
            f"params: model.synthetic.vocab_size ({spec.vocab_size}) must be at least "
            f"num_regular_tokens + 21 special tokens ({spec.num_regular_tokens + 21})"
        )
    corpus = load_corpus()
    files = build_tokenizer_files(spec.num_regular_tokens, corpus)
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    write_json(out_dir / "config.json", config_json(spec))
    write_json(out_dir / "generation_config.json", generation_config_json(spec))

    corpus_ids = None
    if spec.fit_to_corpus:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        corpus_ids = tok.encode(corpus).ids
    weights = _Weights(spec, shape, corpus_ids)
    specs = hf_tensor_specs(shape)
    total = sum(s.nbytes for s in specs)
    log.info(
        "writing synthetic gpt-oss (%d layers, %d experts, hidden %d): %.1f MB",
        shape.num_hidden_layers,
        shape.num_local_experts,
        shape.hidden_size,
        total / 1e6,
    )
    with (
        ShardedWriter(
            out_dir,
            specs,
            max_shard_bytes=spec.max_shard_bytes,
            zero_based_names=True,
            metadata={"format": "pt"},
        ) as writer,
        tqdm(
            total=total, unit="B", unit_scale=True, desc="synthesize", leave=False, disable=None
        ) as bar,
    ):
        for ts in specs:
            for part in weights.parts(ts):
                writer.write(ts.name, part)
                bar.update(part.nbytes)
