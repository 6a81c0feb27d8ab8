"""The eval set: text (a local file, the bundled corpus, or a Hub dataset) -> token windows.

`eval_windows(eval_config, model_dir)` is what reference computes on: `num_windows`
non-overlapping windows of `window_length` tokens spread evenly over the text, tokenized
with the model's own tokenizer. The reference stores the windows it used, so validate
never re-tokenizes.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path

import numpy as np

from tierquant.errors import TierquantError


@dataclass
class TextSet:
    """A set of token windows: text -> tokens -> `num_windows` windows of `window_length`.

    `source: text` reads `path` (null: the bundled tierquant/assets/corpus.txt);
    `source: hub` fetches `files` (a path or glob in the dataset repo: .txt, .json,
    .jsonl) of dataset `repo_id`@`revision`, joining `text_column` of each record.
    """

    source: str = "text"  # "text" or "hub"
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    files: str | None = None
    text_column: str = "text"
    num_windows: int = 16
    window_length: int = 128
    batch_size: int = 4


@dataclass
class EvalSet(TextSet):
    """The eval set (TextSet's fields); `top_k` reference log-probs per token are
    stored (see tierquant.quality.evaluate)."""

    top_k: int = 64


@dataclass
class CalibrationSet(TextSet):
    """The calibration set the `measure` stage computes damage on (tierquant.quality.calibration):
    TextSet's fields. When it reads the same text as the eval set, its windows are
    placed between the eval windows, so no token position is in both (checked).
    """


def load_corpus() -> str:
    """Return the bundled public-domain English corpus (``tierquant/assets/corpus.txt``)."""
    return resources.files("tierquant").joinpath("assets/corpus.txt").read_text(encoding="utf-8")


def load_eval_text(ev: EvalSet, *, endpoint: str | None = None) -> str:
    """The eval text: a local file, the bundled corpus (`path: null`), or a Hub dataset.

    `endpoint` (default: HF_ENDPOINT or the Hub) is where a `hub` source is fetched from.
    """
    if ev.source == "text":
        if ev.path is None:
            return load_corpus()
        path = Path(ev.path)
        if not path.is_file():
            raise TierquantError(f"eval.path: {path} is not a file")
        return path.read_text(encoding="utf-8")
    if ev.source == "hub":
        return _load_hub_text(ev, endpoint)
    raise TierquantError(f"eval.source must be 'text' or 'hub', got {ev.source!r}")


def _load_hub_text(ev: EvalSet, endpoint: str | None) -> str:
    """Fetch `eval.files` of dataset `eval.repo_id` and join `eval.text_column`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not ev.repo_id or not ev.files:
        raise TierquantError("eval.source is 'hub': set eval.repo_id and eval.files")
    what = f"dataset {ev.repo_id!r}@{ev.revision or 'main'}"
    with tempfile.TemporaryDirectory(prefix="tierquant-eval-") as tmp:
        try:
            snapshot_download(
                ev.repo_id,
                repo_type="dataset",
                revision=ev.revision,
                allow_patterns=[ev.files],
                local_dir=tmp,
                endpoint=endpoint,
            )
        except RevisionNotFoundError as e:
            raise TierquantError(f"eval.revision: {ev.revision!r} not found in {what}") from e
        except RepositoryNotFoundError as e:
            raise TierquantError(f"eval.repo_id: {what} not found (or private)") from e
        except HfHubHTTPError as e:
            raise TierquantError(f"the Hub failed while fetching {what}: {e}") from e
        except OSError as e:  # connection errors, offline mode
            raise TierquantError(f"cannot fetch {what}: {type(e).__name__}: {e}") from e
        root = Path(tmp)
        paths = sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and ".cache" not in p.relative_to(root).parts
            and fnmatchcase(p.relative_to(root).as_posix(), ev.files)
        )
        if not paths:
            raise TierquantError(f"eval.files: no file of {what} matches {ev.files!r}")
        return "\n\n".join(_read_records(p, ev.text_column) for p in paths)


def _read_records(path: Path, column: str) -> str:
    """Text of one dataset file: .txt as is; .jsonl/.json/.parquet records' `column`."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        return path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data if isinstance(data, list) else data.get("rows") or data.get("data") or []
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise TierquantError(f"{path.name}: reading parquet needs pyarrow installed") from e
        table = pq.read_table(path)
        if column not in table.column_names:
            raise TierquantError(
                f"eval.text_column: {column!r} not in {path.name} (has {table.column_names})"
            )
        return "\n".join(str(x) for x in table.column(column).to_pylist() if x)
    else:
        raise TierquantError(f"eval.files: {path.name}: unsupported type (txt, jsonl, json)")
    texts = []
    for row in rows:
        if not isinstance(row, dict) or column not in row:
            raise TierquantError(f"eval.text_column: {column!r} missing in a record of {path.name}")
        if row[column]:
            texts.append(str(row[column]))
    return "\n".join(texts)


def tokenize(text: str, model_dir: Path) -> list[int]:
    """Token ids of `text` with the model's own tokenizer (no BOS/special tokens added)."""
    from transformers import AutoTokenizer

    from tierquant.core.gptoss import verify_side_files

    verify_side_files(Path(model_dir))  # a broken tokenizer file is named, not a traceback
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return list(tok.encode(text, add_special_tokens=False))


def make_windows(tokens: list[int] | np.ndarray, num_windows: int, window_length: int):
    """`num_windows` non-overlapping windows spread evenly over `tokens` → int32 [N, L]."""
    ids = np.asarray(tokens, dtype=np.int32)
    need = num_windows * window_length
    if len(ids) < need:
        raise TierquantError(
            f"eval: the text has {len(ids)} tokens, fewer than eval.num_windows × "
            f"eval.window_length = {num_windows} × {window_length} = {need}; use a longer "
            "text (eval.path / eval.files) or fewer/shorter windows"
        )
    stride = len(ids) // num_windows
    return np.stack([ids[i * stride : i * stride + window_length] for i in range(num_windows)])


def eval_windows(ev: EvalSet, model_dir: Path) -> np.ndarray:
    """The eval set of `ev`, tokenized with the tokenizer in `model_dir`."""
    return make_windows(tokenize(load_eval_text(ev), model_dir), ev.num_windows, ev.window_length)
