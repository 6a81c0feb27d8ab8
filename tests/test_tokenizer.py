"""Tests for the synthetic gpt-oss tokenizer files (tierquant.source.tokenizer)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tierquant.core.gptoss import TOKENIZER_FILES
from tierquant.errors import TierquantError
from tierquant.quality.evalset import load_corpus
from tierquant.source.tokenizer import (
    SPECIAL_TOKENS,
    build_tokenizer_files,
    special_token_ids,
)

N = 1000  # regular tokens in the test tokenizer


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


# Texts that must survive encode -> decode: non-ASCII, digits, runs of whitespace, contractions.
ROUND_TRIP_TEXTS = [
    "It is a truth universally acknowledged.",
    "Numbers: 0 7 42 1888 3.14159 -273.15 1,000,000 and 2024-06-01T12:00:00Z",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 🙂🚀!",
    "tabs\tand\n\nnewlines\r\n  indented   spaces   \n",
    "I'M SHOUTING, you're not; they'll've? CamelCaseWords and snake_case_words",
    "code: def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "Out-of-vocabulary: zxqv ßß ᚠᛇᚻ \u200b\u00a0\u2028 end",
]

# offsets of the named specials from the first special id (real ids 199998.. in gpt-oss)
REAL_OFFSETS = {
    "<|startoftext|>": 0,
    "<|endoftext|>": 1,
    "<|return|>": 4,
    "<|constrain|>": 5,
    "<|channel|>": 7,
    "<|start|>": 8,
    "<|end|>": 9,
    "<|message|>": 10,
    "<|call|>": 14,
    "<|endofprompt|>": 20,
}


def _write(directory: Path, with_config: bool) -> Path:
    write_tokenizer_files(directory, N)
    if with_config:  # a minimal model config, as the synthetic checkpoint has
        cfg = {"model_type": "gpt_oss", "vocab_size": N + len(SPECIAL_TOKENS)}
        (directory / "config.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("tok"), with_config=False)


@pytest.fixture(scope="module", params=[False, True], ids=["no-config", "gpt_oss-config"])
def hf_tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    directory = _write(tmp_path_factory.mktemp("hf"), with_config=request.param)
    return transformers.AutoTokenizer.from_pretrained(directory)


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def test_special_token_ids_follow_regular_tokens() -> None:
    assert len(SPECIAL_TOKENS) == 21
    assert len(set(SPECIAL_TOKENS)) == 21
    ids = special_token_ids(N)
    assert list(ids) == list(SPECIAL_TOKENS)
    assert list(ids.values()) == list(range(N, N + 21))
    for token, offset in REAL_OFFSETS.items():
        assert ids[token] == N + offset
    reserved = [t for t in SPECIAL_TOKENS if t.startswith("<|reserved_")]
    assert [int(t[11:-2]) - 199998 for t in reserved] == [SPECIAL_TOKENS.index(t) for t in reserved]


def test_corpus_asset() -> None:
    corpus = load_corpus()
    assert 25_000 <= len(corpus.encode("utf-8")) <= 40_000
    assert "\n\n" in corpus
    assert corpus.startswith("It is a truth universally acknowledged")


def test_build_is_byte_identical_across_runs_and_processes() -> None:
    corpus = load_corpus()
    first = build_tokenizer_files(N, corpus)
    assert set(first) == set(TOKENIZER_FILES)
    assert first == build_tokenizer_files(N, corpus)
    # Another interpreter with a different string-hash seed must produce the same bytes.
    code = (
        "import hashlib, json; "
        "from tierquant.quality.evalset import load_corpus;"
        "from tierquant.source.tokenizer import build_tokenizer_files;"
        f"f = build_tokenizer_files({N}, load_corpus());"
        "print(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in sorted(f.items())}))"
    )
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
        ).stdout
        assert json.loads(out.strip().splitlines()[-1]) == _digests(first)
    for name, data in first.items():
        assert data.endswith(b"\n"), name
    assert build_tokenizer_files(N + 1, corpus)["tokenizer.json"] != first["tokenizer.json"]


def test_tokenizer_json_layout() -> None:
    data = json.loads(build_tokenizer_files(N, load_corpus())["tokenizer.json"])
    model = data["model"]
    assert model["type"] == "BPE"
    vocab = model["vocab"]
    assert len(vocab) == N
    assert sorted(vocab.values()) == list(range(N))
    assert list(vocab.values()) == list(range(N))  # written in id order
    # the 256 byte tokens come first, in o200k's order ("!" is id 0)
    from tokenizers.pre_tokenizers import ByteLevel

    assert list(vocab)[:256] == sorted(ByteLevel.alphabet())
    assert vocab["!"] == 0
    merges = model["merges"]
    assert len(merges) >= N - 256
    for left, right in merges:
        assert left in vocab and right in vocab and left + right in vocab
    assert len({tuple(m) for m in merges}) == len(merges)
    added = data["added_tokens"]
    assert [a["content"] for a in added] == list(SPECIAL_TOKENS)
    assert [a["id"] for a in added] == list(range(N, N + 21))
    assert all(a["special"] and not a["normalized"] for a in added)
    assert data["decoder"]["type"] == "ByteLevel"
    pre = data["pre_tokenizer"]["pretokenizers"]
    assert [p["type"] for p in pre] == ["Split", "ByteLevel"]


def test_tokenizer_json_is_canonical_for_tokenizers() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    text = build_tokenizer_files(N, load_corpus())["tokenizer.json"].decode("utf-8")
    tok = tokenizers.Tokenizer.from_str(text)
    # tokenizers re-serializes it to the same structure: nothing was dropped or misnamed
    assert json.loads(tok.to_str()) == json.loads(text)
    assert tok.get_vocab_size(with_added_tokens=False) == N
    assert tok.get_vocab_size(with_added_tokens=True) == N + 21


def test_config_files() -> None:
    files = build_tokenizer_files(N, load_corpus())
    config = json.loads(files["tokenizer_config.json"])
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|startoftext|>",
        "<|return|>",
        "<|endoftext|>",
    )
    decoder = config["added_tokens_decoder"]
    assert {int(k): v["content"] for k, v in decoder.items()} == {
        i: t for t, i in special_token_ids(N).items()
    }
    assert all(v["special"] for v in decoder.values())
    assert isinstance(config["model_max_length"], int)
    special_map = json.loads(files["special_tokens_map.json"])
    assert special_map == {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
    }


def test_write_tokenizer_files(tmp_path: Path) -> None:
    ids = write_tokenizer_files(tmp_path / "out", 300, corpus=load_corpus())
    assert ids == special_token_ids(300)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(TOKENIZER_FILES)
    built = build_tokenizer_files(300, load_corpus())
    for name, data in built.items():
        assert (tmp_path / "out" / name).read_bytes() == data


def test_bad_sizes_raise() -> None:
    with pytest.raises(TierquantError, match="at least 256"):
        build_tokenizer_files(255, load_corpus())
    with pytest.raises(TierquantError, match="ran out of pairs"):
        build_tokenizer_files(300, "tiny corpus")


def test_a_larger_vocab_builds_whole() -> None:
    """2000 regular tokens from the bundled corpus: every id used once, specials after."""
    from tokenizers import Tokenizer

    files = build_tokenizer_files(2000, load_corpus())
    tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    assert tok.get_vocab_size() == 2000 + 21
    assert sorted(tok.get_vocab().values()) == list(range(2000 + 21))
    assert tok.token_to_id("<|startoftext|>") == 2000
    text = "The sea was calm, and the ship sailed on."
    assert tok.decode(tok.encode(text).ids) == text


def test_hf_round_trip(hf_tok) -> None:
    assert len(hf_tok) == N + 21
    for text in ROUND_TRIP_TEXTS:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert max(ids) < N, text  # plain text never yields special ids
        assert hf_tok.decode(ids) == text
    # no BOS/EOS added by default, like gpt-oss
    assert hf_tok.encode("hello") == hf_tok.encode("hello", add_special_tokens=False)


def test_hf_special_tokens(hf_tok) -> None:
    ids = special_token_ids(N)
    for token, token_id in ids.items():
        assert hf_tok.encode(token, add_special_tokens=False) == [token_id]
        assert hf_tok.convert_ids_to_tokens(token_id) == token
    assert hf_tok.bos_token_id == ids["<|startoftext|>"]
    assert hf_tok.eos_token_id == ids["<|return|>"]
    assert hf_tok.pad_token_id == ids["<|endoftext|>"]
    text = "<|start|>user<|message|>Hi there<|end|>"
    encoded = hf_tok.encode(text, add_special_tokens=False)
    assert encoded[0] == ids["<|start|>"] and encoded[-1] == ids["<|end|>"]
    assert ids["<|message|>"] in encoded
    assert hf_tok.decode(encoded) == text
    assert hf_tok.decode(encoded, skip_special_tokens=True) == "userHi there"


def test_hf_chat_template(hf_tok) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4.", "thinking": "Simple sum."},
        {"role": "user", "content": "And 3+3?"},
    ]
    system = (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. "
        "Channel must be included for every message.<|end|>"
    )
    expected = (
        system + "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
        "<|start|>user<|message|>What is 2+2?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Simple sum.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>4.<|end|>"
        "<|start|>user<|message|>And 3+3?<|end|>"
        "<|start|>assistant"
    )
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out == expected
    plain = hf_tok.apply_chat_template(messages[1:2], add_generation_prompt=False, tokenize=False)
    assert plain == system + "<|start|>user<|message|>What is 2+2?<|end|>"
    high = hf_tok.apply_chat_template(
        messages[1:2], add_generation_prompt=True, tokenize=False, reasoning_effort="high"
    )
    assert "Reasoning: high" in high and high.endswith("<|end|><|start|>assistant")
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    assert ids[0] == special_token_ids(N)["<|start|>"]
    assert hf_tok.decode(ids) == expected


@pytest.mark.parametrize("with_config", [False, True], ids=["no-config", "gpt_oss-config"])
def test_mlx_lm_load_and_stream(tmp_path: Path, with_config: bool) -> None:
    pytest.importorskip("mlx_lm")
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
    from mlx_lm.utils import load_tokenizer

    directory = _write(tmp_path, with_config=with_config)
    wrapper = load_tokenizer(directory)
    assert wrapper.eos_token_id == special_token_ids(N)["<|return|>"]
    detok = wrapper.detokenizer
    assert isinstance(detok, BPEStreamingDetokenizer)
    for text in [*ROUND_TRIP_TEXTS, load_corpus()[:3000]]:
        ids = wrapper.encode(text, add_special_tokens=False)
        detok.reset()
        segments = []
        for token in ids:
            detok.add_token(token)
            segments.append(detok.last_segment)
        detok.finalize()
        segments.append(detok.last_segment)
        assert detok.text == text
        assert "".join(segments) == text
    chat = wrapper.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")


def test_corpus_bytes_per_token(hf_tok) -> None:
    corpus = load_corpus()
    n_bytes = len(corpus.encode("utf-8"))
    ratio = n_bytes / len(hf_tok.encode(corpus, add_special_tokens=False))
    print(f"bytes/token on corpus at num_regular={N}: {ratio:.3f}")
    assert 2.5 <= ratio <= 4.5
