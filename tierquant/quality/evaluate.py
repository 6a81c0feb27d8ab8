"""Quality against the original: the reference log-probs and the per-token comparison.

Two stages, two processes, never both models in memory, each model streamed layer by
layer (tierquant.quality.stream: one decoder layer's weights resident, the eval set's hidden
states carried between layers, the head run on slices of the vocabulary):

- `reference` (`build_reference`) runs the ORIGINAL model (data/original, experts in
  mxfp4) once over the eval windows and writes data/reference/. It depends on the model
  and `eval.*` only, so a new tier setting never reruns it.
- `validate` (`quality_metrics`) runs only the quantized model and reads the reference
  from disk.

Reference format (data/reference/): `tokens.npy` int32 [N, L] (the exact eval
windows; validate uses these, not the text), and for each of the L-1 predicted
positions: `topk_ids.npy` int32 / `topk_logp.npy` float32 [N, L-1, k] (the reference's
k most likely next tokens and their log-probs, descending), `tail_logp.npy` float32
[N, L-1] (log of the remaining mass), `argmax.npy` int32 and `nll.npy` float32 [N, L-1]
(the reference's NLL of the actual next token: its probability is exp(-nll));
plus `meta.json`. At gpt-oss's 201,088-token vocab this is ~8 bytes × k per token (k=64:
8 MB for 16k tokens) instead of 6.4 GB of full fp16 log-probs.

KLD from top-k: the reference's distribution P is coarse-grained into its top-k tokens
plus one "rest" bin, the model's Q into the same bins (Q is known in full at validate):
`KL_k = Σ_{i∈topk} p_i log(p_i/q_i) + p_R log(p_R/q_R)`. By the log-sum inequality
`0 ≤ KL_k ≤ KL` (a lower bound, exact when k ≥ vocab), and the gap is at most
`p_R (log p_k − log min_{i∉topk} q_i) − p_R log(p_R/q_R)` per token (every tail p_i ≤ p_k),
reported as `kld_tail_bound_mean`. KLD of a model against itself is exactly 0: both
sides compute the same float32 quantities of the same logits by the same code
(`head_stats`), so every difference is exactly zero.

Everything here consumes logits as a `LogitChunks`: a callable returning an iterator
of (first vocab id, float32 logits [T, C]) over consecutive slices of the vocabulary
for all T predicted positions (row-major over windows). The streamed model gives many
slices; the whole-model oracle (tests/oracle.py) gives one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierquant.core.files import atomic_output, read_json, write_json
from tierquant.errors import TierquantError
from tierquant.quality.evalset import EvalSet, eval_windows
from tierquant.quality.klstats import row_lse64
from tierquant.quality.stream import VOCAB_SLICE_BYTES, StreamedModel, compute_dtype

log = logging.getLogger(__name__)

REFERENCE_FORMAT = 1
_ARRAYS = ("tokens", "topk_ids", "topk_logp", "tail_logp", "argmax", "nll")

LogitChunks = Callable[[], Iterator[tuple[int, Any]]]


# --- logits → per-token quantities ---------------------------------------------------------


def topk_ids(chunks: LogitChunks, k: int):
    """The ids of the k largest logits of each row, merged over the vocab slices: mx [T, k]."""
    import mlx.core as mx

    vals = ids = None
    for start, logits in chunks():
        kk = min(k, logits.shape[-1])
        idx = mx.argpartition(-logits, kth=kk - 1, axis=-1)[..., :kk]
        v = mx.take_along_axis(logits, idx, axis=-1)
        idx = idx.astype(mx.int32) + start
        if vals is not None:
            v, idx = mx.concatenate([vals, v], axis=-1), mx.concatenate([ids, idx], axis=-1)
        if v.shape[-1] > k:
            sel = mx.argpartition(-v, kth=k - 1, axis=-1)[..., :k]
            v, idx = mx.take_along_axis(v, sel, axis=-1), mx.take_along_axis(idx, sel, axis=-1)
        vals, ids = v, idx
        mx.eval(vals, ids)
    return ids


@dataclass
class HeadStats:
    """Per-row quantities of the logits, gathered slice by slice: numpy, [T] unless noted.
    Log-sum-exps are float64 (each slice's float32 max + log of its float32 sum, combined
    on the host), so slicing the vocabulary changes them only by float32 summation order;
    logits are float32 as the model computes them. Subtract `lse` for log-probs."""

    lse: np.ndarray  # log Σ exp(logits)
    at_ids: np.ndarray  # [T, k] logits at the given ids
    rest_lse: np.ndarray  # log Σ exp over the ids NOT given (-inf when none)
    rest_min: np.ndarray  # min logit over the ids not given (+inf when none)
    argmax: np.ndarray  # first id of the largest logit
    target: np.ndarray  # logit of the target id


def head_stats(chunks: LogitChunks, ids, targets) -> HeadStats:
    """One pass over the vocab slices: everything reference and validate need per row.

    `ids` [T, k] distinct ids per row, `targets` [T] the actual next tokens (mx int32).
    """
    import mlx.core as mx

    neg, pos = mx.array(-mx.inf, mx.float32), mx.array(mx.inf, mx.float32)
    rows, k = ids.shape
    lse = np.full(rows, -np.inf)
    rest = np.full(rows, -np.inf)
    best = mx.full((rows,), -mx.inf, mx.float32)
    rest_min = mx.full((rows,), mx.inf, mx.float32)
    at_ids = mx.zeros((rows, k), mx.float32)
    arg = mx.zeros((rows,), mx.int32)
    target = mx.zeros((rows,), mx.float32)
    for start, logits in chunks():
        c = logits.shape[-1]
        # Ids outside this slice point at a sentinel column C (all writes to it agree).
        ext = mx.concatenate([logits, mx.zeros((rows, 1), mx.float32)], axis=-1)
        local = ids - start
        inside = (local >= 0) & (local < c)
        idx = mx.where(inside, local, c)
        at_ids = mx.where(inside, mx.take_along_axis(ext, idx, axis=-1), at_ids)
        lse = np.logaddexp(lse, row_lse64(logits))
        rest = np.logaddexp(rest, row_lse64(mx.put_along_axis(ext, idx, neg, axis=-1)[:, :c]))
        masked = mx.put_along_axis(ext, idx, pos, axis=-1)[:, :c]
        rest_min = mx.minimum(rest_min, mx.min(masked, axis=-1))
        cmax = mx.max(logits, axis=-1)
        better = cmax > best
        arg = mx.where(better, mx.argmax(logits, axis=-1).astype(mx.int32) + start, arg)
        best = mx.where(better, cmax, best)
        t_local = targets - start
        t_in = (t_local >= 0) & (t_local < c)
        t_idx = mx.where(t_in, t_local, c)[:, None]
        target = mx.where(t_in, mx.take_along_axis(ext, t_idx, axis=-1)[:, 0], target)
        mx.eval(at_ids, rest_min, arg, best, target)
    return HeadStats(
        lse=lse,
        at_ids=np.array(at_ids),
        rest_lse=rest,
        rest_min=np.array(rest_min),
        argmax=np.array(arg).astype(np.int32),
        target=np.array(target),
    )


def log_probs(logits: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """float32 log-probs of float32 `logits` given their float64 `lse` (broadcast on the
    last axis when `logits` has one more): the one rounding reference and validate share."""
    lse = lse[..., None] if logits.ndim > lse.ndim else lse
    with np.errstate(invalid="ignore"):
        return (logits.astype(np.float64) - lse).astype(np.float32)


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


def compute_reference(
    chunks: LogitChunks, tokens: np.ndarray, *, top_k: int, vocab_size: int, dtype: str
) -> Reference:
    """Top-k log-probs + the rest of the logits `chunks` of `tokens` [N, L] (two passes:
    which ids are the top k, then `head_stats` with them, as validate computes them)."""
    import mlx.core as mx

    n, length = tokens.shape
    k = min(top_k, vocab_size)
    ids = topk_ids(chunks, k)
    targets = mx.array(tokens[:, 1:].reshape(-1).astype(np.int32))
    hs = head_stats(chunks, ids, targets)
    logp = log_probs(hs.at_ids, hs.lse)
    order = np.argsort(-logp, axis=-1, kind="stable")
    ids_np = np.take_along_axis(np.array(ids).astype(np.int32), order, axis=-1)
    logp = np.take_along_axis(logp, order, axis=-1)
    shape = (n, length - 1)
    arrays = {
        "topk_ids": ids_np.reshape(*shape, k),
        "topk_logp": logp.reshape(*shape, k),
        "tail_logp": log_probs(hs.rest_lse, hs.lse).reshape(shape),
        "argmax": hs.argmax.reshape(shape),
        "nll": -log_probs(hs.target, hs.lse).reshape(shape),
    }
    meta = {
        "format": REFERENCE_FORMAT,
        "num_windows": int(n),
        "window_length": int(length),
        "vocab_size": int(vocab_size),
        "top_k": int(k),
        "tail_mass_mean": float(np.mean(np.exp(arrays["tail_logp"].astype(np.float64)))),
        "ppl": float(np.exp(np.mean(arrays["nll"].astype(np.float64)))),
        "compute_dtype": dtype,
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
    if not (path / "meta.json").is_file():
        raise TierquantError(f"{path}/meta.json: missing; run the reference stage first")
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


def kept_if_small(chunks: LogitChunks, rows: int, vocab: int) -> LogitChunks:
    """`chunks` computed once and kept when all the logits fit one vocab slice's budget
    (VOCAB_SLICE_BYTES), so the reference's two passes run the head once; else as is."""
    if rows * vocab * 4 > VOCAB_SLICE_BYTES:
        return chunks
    kept = list(chunks())
    return lambda: iter(kept)


def streamed_reference(
    model_dir: Path,
    tokens: np.ndarray,
    *,
    top_k: int,
    batch_size: int,
    vocab_chunk: int | None = None,
) -> Reference:
    """The reference of the model in `model_dir`, streamed layer by layer."""
    dtype = compute_dtype()
    with StreamedModel(model_dir, compute_dtype=dtype) as sm:
        hidden = sm.forward(tokens, batch_size=batch_size)[:, :-1]
        chunks = kept_if_small(
            lambda: sm.logit_chunks(hidden, vocab_chunk=vocab_chunk),
            rows=hidden.shape[0] * hidden.shape[1],
            vocab=sm.vocab_size,
        )
        ref = compute_reference(
            chunks,
            tokens,
            top_k=top_k,
            vocab_size=sm.vocab_size,
            dtype=dtype,
        )
    ref.meta["batch_size"] = int(batch_size)
    return ref


def build_reference(*, original: Path, out: Path, eval_config: EvalSet) -> Path:
    """The reference stage: the original model over the eval windows → `out`."""
    original, out = Path(original), Path(out)
    tokens = eval_windows(eval_config, original)
    log.info("eval set: %d windows × %d tokens (%s)", *tokens.shape, eval_config.source)
    ref = streamed_reference(
        original, tokens, top_k=eval_config.top_k, batch_size=eval_config.batch_size
    )
    ref.meta["eval"] = asdict(eval_config)
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


# --- the model against the reference --------------------------------------------------------


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of a model against the reference, all [N, L-1]."""

    kld: np.ndarray
    tail_bound: np.ndarray  # upper bound of KL - kld (the top-k estimate's error)
    agree: np.ndarray
    nll: np.ndarray


def token_stats(chunks: LogitChunks, ref: Reference) -> TokenStats:
    """Compare the logits `chunks` of the reference's windows with it, token by token."""
    import mlx.core as mx

    shape = ref.nll.shape
    k = ref.topk_ids.shape[-1]
    p_logp = ref.topk_logp.reshape(-1, k).astype(np.float64)
    p_tail = ref.tail_logp.reshape(-1).astype(np.float64)
    targets = mx.array(ref.tokens[:, 1:].reshape(-1).astype(np.int32))
    hs = head_stats(chunks, mx.array(ref.topk_ids.reshape(-1, k)), targets)
    q_top = log_probs(hs.at_ids, hs.lse).astype(np.float64)
    q_tail = log_probs(hs.rest_lse, hs.lse).astype(np.float64)
    q_min = log_probs(hs.rest_min, hs.lse).astype(np.float64)
    kl_top = np.sum(np.exp(p_logp) * (p_logp - q_top), axis=-1)
    has_tail = p_tail > -np.inf
    p_r = np.exp(p_tail)
    with np.errstate(invalid="ignore"):
        kl_tail = np.where(has_tail, p_r * (p_tail - q_tail), 0.0)
        worst = p_r * (p_logp[..., -1] - q_min)
        bound = np.where(has_tail, np.maximum(worst - kl_tail, 0.0), 0.0)
    return TokenStats(
        kld=(kl_top + kl_tail).reshape(shape),
        tail_bound=bound.reshape(shape),
        agree=(hs.argmax == ref.argmax.reshape(-1)).reshape(shape),
        nll=-log_probs(hs.target, hs.lse).reshape(shape),
    )


def check_reference_dtype(ref: Reference, reference_dir: Path) -> None:
    """The reference must be computed in this backend's activation dtype."""
    ref_dtype = ref.meta.get("compute_dtype", "bfloat16")
    if ref_dtype != compute_dtype():
        raise TierquantError(
            f"{reference_dir}: the reference was computed in {ref_dtype} activations but "
            f"this backend computes in {compute_dtype()} (see tierquant.quality.stream."
            "compute_dtype); recompute it here: `dvc repro -f reference`"
        )


def streamed_token_stats(
    model_dir: Path, ref: Reference, *, batch_size: int, vocab_chunk: int | None = None
) -> TokenStats:
    """Run the model in `model_dir` streamed over the reference's windows → TokenStats."""
    with StreamedModel(model_dir, compute_dtype=compute_dtype()) as sm:
        if sm.vocab_size != ref.meta["vocab_size"]:
            raise TierquantError(
                f"{model_dir}: vocab {sm.vocab_size} != the reference's {ref.meta['vocab_size']}"
            )
        hidden = sm.forward(ref.tokens, batch_size=batch_size)[:, :-1]
        return token_stats(lambda: sm.logit_chunks(hidden, vocab_chunk=vocab_chunk), ref)


def quality_metrics(
    *, model_dir: Path, reference_dir: Path, vocab_chunk: int | None = None
) -> dict[str, Any]:
    """Stream ONLY the model in `model_dir` (the reference is read from disk) → metrics.

    Adds `peak_memory_bytes` (MLX's peak while evaluating: one layer's weights, the eval
    set's hidden states and one batch's activations) and `model_bytes` (the model's
    tensors on disk).
    """
    import mlx.core as mx

    from tierquant.core.checkpoint import Checkpoint
    from tierquant.quality.klstats import summarize

    ref = load_reference(reference_dir)
    check_reference_dtype(ref, reference_dir)
    mx.reset_peak_memory()
    stats = streamed_token_stats(
        model_dir, ref, batch_size=int(ref.meta["batch_size"]), vocab_chunk=vocab_chunk
    )
    metrics: dict[str, Any] = summarize(stats, ref)
    metrics["peak_memory_bytes"] = int(mx.get_peak_memory())
    with Checkpoint(model_dir) as ckpt:
        metrics["model_bytes"] = sum(i.nbytes for i in ckpt.tensors.values())
    return metrics
