"""Tokenizer files for a tiny synthetic gpt-oss checkpoint.

The files mimic the layout of openai/gpt-oss-120b's tokenizer (o200k_harmony converted to the
Hugging Face ``tokenizers`` format): a byte-level BPE ``tokenizer.json`` whose regular tokens
are followed by the 21 Harmony special tokens, plus ``tokenizer_config.json``,
``special_tokens_map.json`` and a Harmony ``chat_template.jinja``. The BPE merges are learned
offline and deterministically from a small public-domain corpus by the ``tokenizers``
library's BpeTrainer (the library mlx-lm and transformers load tokenizer.json with).
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from tierquant.core.files import json_bytes
from tierquant.errors import TierquantError

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


def train_tokenizer(corpus: str, num_regular: int) -> Tokenizer:
    """A byte-level BPE tokenizer laid out like gpt-oss's, trained on ``corpus``.

    The `tokenizers` library's BpeTrainer learns the merges (deterministic: most frequent
    pair first) from the 256 ByteLevel byte tokens (ids 0-255, by code point: "!" is 0)
    until there are ``num_regular`` regular tokens; the 21 special tokens follow them.
    """
    if num_regular < NUM_BYTE_TOKENS:
        raise TierquantError(f"num_regular must be at least {NUM_BYTE_TOKENS}, got {num_regular}")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=True, trim_offsets=False, use_regex=True
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=num_regular,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer)
    got = tok.get_vocab_size(with_added_tokens=False)
    if got < num_regular:
        raise TierquantError(
            f"corpus too small: BPE ran out of pairs at {got} of {num_regular} tokens"
        )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    specials = special_token_ids(num_regular)
    if any(tok.token_to_id(t) != i for t, i in specials.items()):  # the layout gpt-oss has
        raise TierquantError(
            f"tokenizer: the 21 special tokens must take ids {num_regular}.."
            f"{num_regular + 20}, right after the regular tokens (the gpt-oss layout)"
        )
    return tok


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
    tok = train_tokenizer(corpus, num_regular)
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    return {
        "tokenizer.json": json_bytes(json.loads(tok.to_str())),
        "tokenizer_config.json": json_bytes(_tokenizer_config(num_regular)),
        "special_tokens_map.json": json_bytes(special_map),
        "chat_template.jinja": CHAT_TEMPLATE.encode("utf-8"),
    }
