"""Quality against the original: eval windows, reference log-probs, KLD metrics, the gate.

Two stages, two processes, never both models in memory:

- `reference` (`build_reference`) runs the ORIGINAL model (data/original, experts in
  mxfp4, through stock `mlx_lm.load`) once over the eval windows and writes
  data/reference/. It depends on the model and `eval.*` only, so a new tier setting
  never reruns it.
- `validate` (`validate_model`) loads only the quantized model and reads the
  reference from disk: its peak memory is the quantized model plus one eval batch
  (`eval.batch_size` × `eval.window_length` × vocab float32 log-probs, a few copies).

Reference format (data/reference/): `tokens.npy` int32 [N, L] (the exact eval
windows; validate uses these, not the text), and for each of the L-1 predicted
positions: `topk_ids.npy` int32 / `topk_logp.npy` float32 [N, L-1, k] (the reference's
k most likely next tokens and their log-probs, descending), `tail_logp.npy` float32
[N, L-1] (log of the remaining mass), `argmax.npy` int32 and `nll.npy` float32 [N, L-1];
plus `meta.json`. At gpt-oss's 201,088-token vocab this is ~8 bytes × k per token (k=64:
8 MB for 16k tokens) instead of 6.4 GB of full fp16 log-probs.

KLD from top-k: the reference's distribution P is coarse-grained into its top-k tokens
plus one "rest" bin, the model's Q into the same bins (Q is known in full at validate):
`KL_k = Σ_{i∈topk} p_i log(p_i/q_i) + p_R log(p_R/q_R)`. By the log-sum inequality
`0 ≤ KL_k ≤ KL` (a lower bound, exact when k ≥ vocab), and the gap is at most
`p_R (log p_k − log min_{i∉topk} q_i) − p_R log(p_R/q_R)` per token (every tail p_i ≤ p_k),
reported as `kld_tail_bound_mean`. Measured on the tiny model (vocab 1024, k=64): see
README "Quality metrics". KLD of a model against itself is exactly 0: both sides use the
same float32 log-softmax of the same logits, batched the same way.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, EvalConfig
from .errors import TierquantError
from .files import atomic_output, read_json, write_json

log = logging.getLogger(__name__)

REFERENCE_FORMAT = 1
_ARRAYS = ("tokens", "topk_ids", "topk_logp", "tail_logp", "argmax", "nll")


# --- eval set -----------------------------------------------------------------------------


def load_eval_text(ev: EvalConfig, *, endpoint: str | None = None) -> str:
    """The eval text: a local file, the bundled corpus (`path: null`), or a Hub dataset.

    `endpoint` (default: HF_ENDPOINT or the Hub) is where a `hub` source is fetched from.
    """
    if ev.source == "text":
        if ev.path is None:
            from .tokenizer import load_corpus

            return load_corpus()
        path = Path(ev.path)
        if not path.is_file():
            raise TierquantError(f"eval.path: {path} is not a file")
        return path.read_text(encoding="utf-8")
    if ev.source == "hub":
        return _load_hub_text(ev, endpoint)
    raise TierquantError(f"eval.source must be 'text' or 'hub', got {ev.source!r}")


def _load_hub_text(ev: EvalConfig, endpoint: str | None) -> str:
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

    from .gptoss import verify_side_files

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


def eval_windows(ev: EvalConfig, model_dir: Path) -> np.ndarray:
    """The eval set of `ev`, tokenized with the tokenizer in `model_dir`."""
    return make_windows(tokenize(load_eval_text(ev), model_dir), ev.num_windows, ev.window_length)


# --- model forward --------------------------------------------------------------------------


def compute_dtype() -> str:
    """The activation dtype of reference and validate on this backend.

    On a GPU (Metal, CUDA) models run as stock mlx-lm runs them (bf16). MLX's CPU
    backend runs quantized matmuls about 8x faster with float32 activations than with
    bf16 (and has no bf16 gather_mm at all), so on the CPU both the reference and the
    quantized model compute in float32: the same weights, a cleaner comparison (no bf16
    activation noise), and the same choice on both sides.
    """
    import mlx.core as mx

    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def _load_model(model_dir: Path):
    """Load an mlx-lm model dir with stock `mlx_lm.load` (the one place models load)."""
    import mlx.core as mx
    from mlx_lm import load

    if not (Path(model_dir) / "config.json").is_file():
        raise TierquantError(f"{model_dir}: not a model directory (no config.json)")
    model, _ = load(str(model_dir))
    if compute_dtype() == "float32":
        model.set_dtype(mx.float32)  # floating params only; packed weights stay as stored
    return model


def _batches(tokens: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, len(tokens), batch_size):
        yield start, tokens[start : start + batch_size]


def _logprobs(model, batch: np.ndarray):
    """float32 next-token log-probs at positions 0..L-2: mx [B, L-1, V]."""
    import mlx.core as mx

    logits = model(mx.array(batch))[:, :-1, :].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


# --- reference ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """The reference arrays (see module docstring) and meta."""

    tokens: np.ndarray
    topk_ids: np.ndarray
    topk_logp: np.ndarray
    tail_logp: np.ndarray
    argmax: np.ndarray
    nll: np.ndarray
    meta: dict[str, Any]


def compute_reference(model, tokens: np.ndarray, top_k: int, batch_size: int) -> Reference:
    """Run `model` over `tokens` [N, L] in batches; keep top-k log-probs + the rest."""
    import mlx.core as mx

    out: dict[str, list[np.ndarray]] = {k: [] for k in _ARRAYS[1:]}
    vocab = 0
    for _, batch in _batches(tokens, batch_size):
        logp = _logprobs(model, batch)
        vocab = logp.shape[-1]
        k = min(top_k, vocab)
        idx = mx.argpartition(-logp, kth=k - 1, axis=-1)[..., :k]
        vals = mx.take_along_axis(logp, idx, axis=-1)
        order = mx.argsort(-vals, axis=-1)
        idx = mx.take_along_axis(idx, order, axis=-1)
        vals = mx.take_along_axis(vals, order, axis=-1)
        if k < vocab:
            rest = mx.put_along_axis(logp, idx, mx.array(-mx.inf, mx.float32), axis=-1)
            tail = mx.logsumexp(rest, axis=-1)
        else:
            tail = mx.full(logp.shape[:-1], -mx.inf, mx.float32)
        targets = mx.array(batch[:, 1:, None])
        nll = -mx.take_along_axis(logp, targets, axis=-1)[..., 0]
        argmax = mx.argmax(logp, axis=-1)
        mx.eval(idx, vals, tail, nll, argmax)
        out["topk_ids"].append(np.array(idx.astype(mx.int32)))
        out["topk_logp"].append(np.array(vals))
        out["tail_logp"].append(np.array(tail))
        out["argmax"].append(np.array(argmax.astype(mx.int32)))
        out["nll"].append(np.array(nll))
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    meta = {
        "format": REFERENCE_FORMAT,
        "num_windows": int(tokens.shape[0]),
        "window_length": int(tokens.shape[1]),
        "vocab_size": int(vocab),
        "top_k": int(min(top_k, vocab)),
        "batch_size": int(batch_size),
        "tail_mass_mean": float(np.mean(np.exp(arrays["tail_logp"].astype(np.float64)))),
        "ppl": float(np.exp(np.mean(arrays["nll"].astype(np.float64)))),
        "compute_dtype": compute_dtype(),
    }
    return Reference(tokens=tokens.astype(np.int32), meta=meta, **arrays)


def save_reference(ref: Reference, out: Path) -> None:
    """Write `ref` into the directory `out` (new files only)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in _ARRAYS:
        np.save(out / f"{name}.npy", getattr(ref, name))
    write_json(out / "meta.json", ref.meta)


def load_reference(path: Path) -> Reference:
    """Read data/reference written by `save_reference`; a missing file is named."""
    path = Path(path)
    meta = read_json(path / "meta.json")
    if meta.get("format") != REFERENCE_FORMAT:
        raise TierquantError(f"{path}/meta.json: reference format {meta.get('format')!r} != 1")
    arrays = {}
    for name in _ARRAYS:
        f = path / f"{name}.npy"
        if not f.is_file():
            raise TierquantError(f"{f}: missing; rerun the reference stage")
        try:
            arrays[name] = np.load(f)
        except (ValueError, EOFError) as e:  # truncated or not an .npy file
            raise TierquantError(f"{f}: unreadable ({e}); rerun the reference stage") from e
    return Reference(meta=meta, **arrays)


def build_reference(config: Config) -> Path:
    """The reference stage: original model over the eval windows → paths.reference."""
    original, out = Path(config.paths.original), Path(config.paths.reference)
    ev = config.eval
    tokens = eval_windows(ev, original)
    log.info("eval set: %d windows × %d tokens (%s)", *tokens.shape, ev.source)
    model = _load_model(original)
    ref = compute_reference(model, tokens, ev.top_k, ev.batch_size)
    ref.meta["eval"] = asdict(ev)
    with atomic_output(out) as tmp:
        save_reference(ref, tmp)
    log.info(
        "wrote %s: top-%d of %d, reference PPL %.3f, tail mass %.2e",
        out,
        ref.meta["top_k"],
        ref.meta["vocab_size"],
        ref.meta["ppl"],
        ref.meta["tail_mass_mean"],
    )
    return out


# --- metrics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of a model against the reference, all [N, L-1]."""

    kld: np.ndarray
    tail_bound: np.ndarray  # upper bound of KL - kld (the top-k estimate's error)
    agree: np.ndarray
    nll: np.ndarray


def token_stats(model, ref: Reference, batch_size: int | None = None) -> TokenStats:
    """Run `model` over the reference's windows and compare, token by token."""
    import mlx.core as mx

    batch_size = batch_size or int(ref.meta["batch_size"])
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("kld", "tail_bound", "agree", "nll")}
    for start, batch in _batches(ref.tokens, batch_size):
        sl = slice(start, start + len(batch))
        q = _logprobs(model, batch)
        if q.shape[-1] != ref.meta["vocab_size"]:
            raise TierquantError(
                f"model vocab {q.shape[-1]} != reference vocab {ref.meta['vocab_size']}"
            )
        ids = mx.array(ref.topk_ids[sl])
        p_logp = mx.array(ref.topk_logp[sl])
        p_tail = mx.array(ref.tail_logp[sl])
        q_top = mx.take_along_axis(q, ids, axis=-1)
        kl_top = mx.sum(mx.exp(p_logp) * (p_logp - q_top), axis=-1)
        q_rest = mx.put_along_axis(q, ids, mx.array(-mx.inf, mx.float32), axis=-1)
        q_tail = mx.logsumexp(q_rest, axis=-1)
        has_tail = p_tail > -mx.inf
        p_r = mx.exp(p_tail)
        kl_tail = mx.where(has_tail, p_r * (p_tail - q_tail), 0.0)
        q_min = mx.min(mx.put_along_axis(q, ids, mx.array(mx.inf, mx.float32), axis=-1), axis=-1)
        worst = p_r * (p_logp[..., -1] - q_min)
        bound = mx.where(has_tail, mx.maximum(worst - kl_tail, 0.0), 0.0)
        targets = mx.array(batch[:, 1:, None])
        nll = -mx.take_along_axis(q, targets, axis=-1)[..., 0]
        agree = mx.argmax(q, axis=-1) == mx.array(ref.argmax[sl])
        kld = kl_top + kl_tail
        mx.eval(kld, bound, agree, nll)
        out["kld"].append(np.array(kld))
        out["tail_bound"].append(np.array(bound))
        out["agree"].append(np.array(agree))
        out["nll"].append(np.array(nll))
    return TokenStats(**{k: np.concatenate(v) for k, v in out.items()})


def summarize(stats: TokenStats, ref: Reference) -> dict[str, float]:
    """The DVC metrics: KLD distribution, top-1 agreement, PPLs, per-window spread."""
    kld = stats.kld.astype(np.float64)
    flat = kld.ravel()
    per_window = kld.mean(axis=1)
    ppl_ref = math.exp(float(np.mean(ref.nll.astype(np.float64))))
    ppl_model = math.exp(float(np.mean(stats.nll.astype(np.float64))))
    metrics = {
        "kld_mean": float(flat.mean()),
        "kld_median": float(np.median(flat)),
        "kld_p99": float(np.percentile(flat, 99)),
        "kld_p99_9": float(np.percentile(flat, 99.9)),
        "kld_max": float(flat.max()),
        "top1_agreement": float(stats.agree.mean()),
        "ppl_reference": ppl_ref,
        "ppl_model": ppl_model,
        "ppl_ratio": ppl_model / ppl_ref,
        "window_kld_min": float(per_window.min()),
        "window_kld_median": float(np.median(per_window)),
        "window_kld_max": float(per_window.max()),
        "window_kld_std": float(per_window.std()),
        "kld_tail_bound_mean": float(stats.tail_bound.astype(np.float64).mean()),
        "reference_tail_mass_mean": float(ref.meta["tail_mass_mean"]),
        "top_k": int(ref.meta["top_k"]),
        "tokens": int(flat.size),
        "windows": int(kld.shape[0]),
        "compute_dtype": str(ref.meta.get("compute_dtype", "bfloat16")),
    }
    return metrics


def quality_metrics(model_dir: Path, reference_dir: Path) -> dict[str, float]:
    """Load ONLY the model in `model_dir` (the reference is read from disk) → metrics.

    Adds `peak_memory_bytes` (MLX's peak while loading and evaluating: the model plus
    one eval batch) and `model_bytes` (the model's tensors on disk).
    """
    import mlx.core as mx

    from .checkpoint import Checkpoint

    ref = load_reference(reference_dir)
    ref_dtype = ref.meta.get("compute_dtype", "bfloat16")
    if ref_dtype != compute_dtype():
        raise TierquantError(
            f"{reference_dir}: the reference was computed in {ref_dtype} activations but "
            f"this backend computes in {compute_dtype()} (see tierquant.evaluate."
            "compute_dtype); recompute it here: `dvc repro -f reference`"
        )
    mx.reset_peak_memory()
    model = _load_model(model_dir)
    metrics: dict[str, float] = summarize(token_stats(model, ref), ref)
    metrics["peak_memory_bytes"] = int(mx.get_peak_memory())
    with Checkpoint(model_dir) as ckpt:
        metrics["model_bytes"] = sum(i.nbytes for i in ckpt.tensors.values())
    return metrics
