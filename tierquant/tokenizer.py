"""Tokenizer files for a tiny synthetic gpt-oss checkpoint.

The files mimic the layout of openai/gpt-oss-120b's tokenizer (o200k_harmony converted to the
Hugging Face ``tokenizers`` format): a byte-level BPE ``tokenizer.json`` whose regular tokens
are followed by the 21 Harmony special tokens, plus ``tokenizer_config.json``,
``special_tokens_map.json`` and a Harmony ``chat_template.jinja``. The BPE merges are learned
here, offline and deterministically, from a small public-domain corpus.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from functools import lru_cache
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

from .errors import TierquantError

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|reserved_200000|>",
    "<|reserved_200001|>",
    "<|return|>",
    "<|constrain|>",
    "<|reserved_200004|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|reserved_200009|>",
    "<|reserved_200010|>",
    "<|reserved_200011|>",
    "<|call|>",
    "<|reserved_200013|>",
    "<|reserved_200014|>",
    "<|reserved_200015|>",
    "<|reserved_200016|>",
    "<|reserved_200017|>",
    "<|endofprompt|>",
)
"""The gpt-oss special tokens in id order (real ids 199998..200018)."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|return|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 131072
NUM_BYTE_TOKENS = 256

# o200k's pre-tokenization regex, as in gpt-oss's tokenizer.json.
PRETOKENIZE_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


# Harmony chat template: a short form of gpt-oss's (no tools, no date line).
CHAT_TEMPLATE = """\
{#- Harmony chat template for the synthetic gpt-oss checkpoint (a short form of gpt-oss's). -#}
{%- set effort = reasoning_effort if reasoning_effort is defined else "medium" -%}
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06

Reasoning: {{ effort }}

# Valid channels: analysis, commentary, final. \
Channel must be included for every message.<|end|>
{%- set loop_messages = messages -%}
{%- if messages and messages[0].role in ["system", "developer"] -%}
<|start|>developer<|message|># Instructions

{{ messages[0].content }}<|end|>
{%- set loop_messages = messages[1:] -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message.role == "assistant" -%}
{%- set thinking = message.thinking or message.reasoning_content or message.reasoning -%}
{%- if thinking -%}
<|start|>assistant<|channel|>analysis<|message|>{{ thinking }}<|end|>
{%- endif -%}
{%- if message.content -%}
<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>
{%- endif -%}
{%- else -%}
<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|start|>assistant
{%- endif -%}
"""


def special_token_ids(num_regular: int) -> dict[str, int]:
    """Map each special token to its id: ``num_regular + index`` in ``SPECIAL_TOKENS``."""
    return {token: num_regular + i for i, token in enumerate(SPECIAL_TOKENS)}


def load_corpus() -> str:
    """Return the bundled public-domain English corpus (``tierquant/assets/corpus.txt``)."""
    return resources.files("tierquant").joinpath("assets/corpus.txt").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's ByteLevel alphabet: a printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _base_tokens() -> list[str]:
    """The 256 byte tokens in o200k's order (the ByteLevel characters by code point)."""
    return sorted(bytes_to_unicode().values())


def _word_counts(corpus: str) -> Counter[str]:
    """Pre-tokenize ``corpus`` like o200k and count each piece in ByteLevel form."""
    import regex  # a dependency of transformers; imported here to keep import time low

    table = bytes_to_unicode()
    counts: Counter[str] = Counter()
    for piece in regex.findall(PRETOKENIZE_PATTERN, corpus):
        counts["".join(table[b] for b in piece.encode("utf-8"))] += 1
    return counts


def train_bpe(corpus: str, num_regular: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn byte-level BPE merges from ``corpus`` until there are ``num_regular`` tokens.

    Returns the regular tokens in id order and the merges in rank order. The most frequent
    pair is merged first; ties go to the lexicographically smallest pair.
    """
    base = _base_tokens()
    if num_regular < len(base):
        raise TierquantError(f"num_regular must be at least {len(base)}, got {num_regular}")
    counts = _word_counts(corpus)
    words = sorted(counts)
    freqs = [counts[w] for w in words]
    symbols: list[list[str]] = [list(w) for w in words]

    pair_counts: defaultdict[tuple[str, str], int] = defaultdict(int)
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, syms in enumerate(symbols):
        for pair in pairwise(syms):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    vocab = list(base)
    known = set(base)
    merges: list[tuple[str, str]] = []
    while len(vocab) < num_regular:
        while heap:
            neg, best = heapq.heappop(heap)
            if pair_counts.get(best, 0) == -neg:
                break
        else:
            raise TierquantError(
                f"corpus too small: BPE ran out of pairs at {len(vocab)} of {num_regular} tokens"
            )
        first, second = best
        merged = first + second
        merges.append(best)
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        touched: set[tuple[str, str]] = set()
        for i in where.pop(best):
            syms, freq = symbols[i], freqs[i]
            for pair in pairwise(syms):
                pair_counts[pair] -= freq
                touched.add(pair)
            out: list[str] = []
            j = 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == first and syms[j + 1] == second:
                    out.append(merged)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            symbols[i] = out
            for pair in pairwise(out):
                pair_counts[pair] += freq
                where[pair].add(i)
                touched.add(pair)
        for pair in touched:
            count = pair_counts[pair]
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            else:
                del pair_counts[pair]
    return vocab, merges


def _dumps(obj: Any) -> bytes:
    """Serialize JSON deterministically: fixed key order, 2-space indent, trailing newline."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _added_token(token_id: int, content: str) -> dict[str, Any]:
    """One ``added_tokens`` entry of tokenizer.json, as ``tokenizers`` serializes it."""
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _tokenizer_json(vocab: list[str], merges: list[tuple[str, str]]) -> dict[str, Any]:
    """tokenizer.json laid out like gpt-oss's (transformers' TikTokenConverter output)."""
    specials = special_token_ids(len(vocab))
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, tok) for tok, i in specials.items()],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": PRETOKENIZE_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        "post_processor": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": False,
            "use_regex": True,
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {tok: i for i, tok in enumerate(vocab)},
            "merges": [list(pair) for pair in merges],
        },
    }


def _tokenizer_config(num_regular: int) -> dict[str, Any]:
    """tokenizer_config.json like gpt-oss's, with the special ids moved to ``num_regular``."""
    decoder = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok, i in special_token_ids(num_regular).items()
    }
    return {
        "added_tokens_decoder": decoder,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def build_tokenizer_files(num_regular: int, corpus: str) -> dict[str, bytes]:
    """Build the tokenizer files: file name -> exact bytes, identical for identical inputs."""
    vocab, merges = train_bpe(corpus, num_regular)
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    return {
        "tokenizer.json": _dumps(_tokenizer_json(vocab, merges)),
        "tokenizer_config.json": _dumps(_tokenizer_config(num_regular)),
        "special_tokens_map.json": _dumps(special_map),
        "chat_template.jinja": CHAT_TEMPLATE.encode("utf-8"),
    }


def write_tokenizer_files(
    out_dir: Path, num_regular: int, corpus: str | None = None
) -> dict[str, int]:
    """Write the tokenizer files into ``out_dir`` and return the special-token ids.

    ``corpus`` defaults to the bundled one (``load_corpus()``).
    """
    text = load_corpus() if corpus is None else corpus
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in build_tokenizer_files(num_regular, text).items():
        (out_dir / name).write_bytes(data)
    return special_token_ids(num_regular)
