"""Layer-streamed forward of a gpt-oss checkpoint: one decoder layer's weights resident.

Any gpt-oss checkpoint in mlx-lm layout runs here: the original (HF names, experts in
mxfp4), the float conversion, an assembled mixed-precision model. The model is built by
stock `mlx_lm.utils.load_model(lazy=True)` (its config handling, `Model.sanitize` for
HF names, `nn.quantize` with its per-module `quantization` class predicate, a strict
weight load), so every module, mask, router and quantized kernel is mlx-lm's own. With
`lazy=True` no weight is read: each array is a lazy read from its safetensors shard.
Those lazy arrays are never evaluated. To run layer i, a FRESH lazy copy of the layer's
tensors is read from the shards (`mx.load`, sanitized the same way), swapped into the
block, evaluated over the eval set, and dropped when the layer is done, so only that
layer's weights are ever resident. The embedding reads only the rows of the tokens in
use; the final norm + lm_head run on slices of the vocabulary (`vocab_chunk` rows read
at a time), so neither the embedding table nor the head is ever whole in memory. On the
CPU backend the head's product (rows dequantized as mlx-lm's QuantizedLinear does, in
float32) runs in numpy's BLAS: MLX's CPU matmul is ~25x slower on Linux, and at a
201088-row vocabulary the head is most of an evaluation's work.

The state carried between layers is the eval set's hidden states, [N, L, hidden] in the
compute dtype (16k tokens x 2880 x 4 B = 190 MB at gpt-oss-120b). Each layer runs over
the windows `batch_size` at a time, so attention/MoE activations stay one batch's.

API (also for callers that measure damage layer by layer, e.g. a `measure` stage):

    with StreamedModel(model_dir, compute_dtype="float32") as sm:
        h = sm.embed(tokens)                          # mx [N, L, D], evaluated
        for i in range(sm.num_layers):
            h = sm.run_layer(i, h, batch_size=4)       # one layer resident
        for start, logits in sm.logit_chunks(h[:, :-1]):
            ...                                        # [N*(L-1), C] float32

- `run_layer(i, hidden, weight_overrides={...})` runs block i with some of its weights
  replaced: keys are full mlx-lm parameter names (`model.layers.3.self_attn.q_proj.weight`),
  values arrays of the same shape/dtype the module holds. Every other weight is the
  checkpoint's. `module_overrides={"model.layers.3.mlp.experts.down_proj": m}` runs
  the block with module `m` (e.g. mlx-lm's QuantizedSwitchLinear at other bits, its
  parameters set) in place of its own: how a precision is tried on a module.
  The block's output is returned; by default each call re-reads the layer, so a caller
  can try many overrides of one layer on one input; `weights=layer_weights(i)` held by
  the caller reads it once for all of them.
- `layer_weights(i)` gives the layer's parameters (fresh lazy arrays, mlx-lm names),
  e.g. as the source of an override.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tierquant.core.checkpoint import Checkpoint
from tierquant.core.parallel import slice_streams
from tierquant.errors import TierquantError

log = logging.getLogger(__name__)

# (parameter name, rows of it) -> rows to use instead: how a caller fake-quantizes the
# row-read tables (embedding, head); quantization groups run along a row, so a slice of
# rows quantizes exactly as the whole table would.
RowTransform = Callable[[str, Any], Any]

# One vocab slice: its float32 logits for every token plus its head rows (the bf16 read
# and a float32 copy) stay under this many bytes.
VOCAB_SLICE_BYTES = 128 * 2**20


def vocab_chunk_for(tokens: int, hidden: int) -> int:
    """Vocab ids per slice so that one slice's logits and head rows fit VOCAB_SLICE_BYTES."""
    per_id = 4 * tokens + 6 * hidden
    return max(256, VOCAB_SLICE_BYTES // per_id)


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


class StreamedModel:
    """A gpt-oss model dir, run one layer at a time (see the module docstring)."""

    def __init__(self, model_dir: Path, *, compute_dtype: str) -> None:
        import mlx.core as mx
        from mlx_lm.utils import load_model

        self.root = Path(model_dir)
        if not (self.root / "config.json").is_file():
            raise TierquantError(f"{self.root}: not a model directory (no config.json)")
        self.ckpt = Checkpoint(self.root)  # headers only: where each tensor's bytes are
        self.model, self.config = load_model(self.root, lazy=True, strict=True)
        self.dtype = {"float32": mx.float32, "bfloat16": None}[compute_dtype]
        inner = self.model.model
        self.layer_types: list[str] = list(inner.layer_types)
        self.window_size: int = int(inner.window_size)
        self.num_layers = len(inner.layers)
        self.vocab_size = int(self.model.args.vocab_size)

    # --- weights --------------------------------------------------------------------------

    def _read(self, prefix: str) -> dict[str, Any]:
        """Fresh lazy arrays of every checkpoint tensor under `prefix`, sanitized by
        mlx-lm's own `Model.sanitize` (HF names of the original → mlx-lm names)."""
        import mlx.core as mx

        names = [n for n in self.ckpt.tensors if n.startswith(prefix)]
        raw: dict[str, Any] = {}
        for path in sorted({self.ckpt.tensors[n].path for n in names}):
            loaded = mx.load(str(path))
            raw.update({n: loaded[n] for n in names if n in loaded})
            del loaded  # the shard's other tensors: lazy, never read
        return self.model.sanitize(raw)

    def layer_weights(self, index: int) -> dict[str, Any]:
        """Layer `index`'s parameters as fresh lazy arrays, full mlx-lm names."""
        return self._read(f"model.layers.{index}.")

    def _swap(self, module, prefix: str, weights: dict[str, Any], *, row_subset: bool = False):
        """Put `weights` (full names under `prefix`) into `module`; return what it held.
        `row_subset`: the weights are some rows of a table (embedding, head)."""
        from mlx.utils import tree_flatten, tree_unflatten

        held = dict(tree_flatten(module.parameters()))
        local = {k[len(prefix) :]: v for k, v in weights.items()}
        if set(local) != set(held):
            extra, missing = sorted(set(local) - set(held)), sorted(set(held) - set(local))
            raise TierquantError(
                f"{self.root}: weights under {prefix!r} do not match the model "
                f"(unexpected {extra[:3]}, missing {missing[:3]})"
            )
        for k, v in local.items():
            same = v.shape[1:] == held[k].shape[1:] if row_subset else v.shape == held[k].shape
            if not same:
                raise TierquantError(
                    f"{prefix}{k}: shape {tuple(v.shape)} != the model's {tuple(held[k].shape)}"
                )
        module.update(tree_unflatten(list(local.items())))
        if self.dtype is not None:
            module.set_dtype(self.dtype)  # floating params only, as mlx-lm's set_dtype
        return tree_unflatten(list(held.items()))

    # --- forward --------------------------------------------------------------------------

    def embed(self, tokens: np.ndarray, *, row_transform: RowTransform | None = None):
        """Embeddings of `tokens` [N, L] (reads only the rows of the ids present).
        `row_transform(name, rows)` may replace the rows read (e.g. fake-quantized)."""
        import mlx.core as mx

        ids = np.asarray(tokens)
        unique, inverse = np.unique(ids, return_inverse=True)
        if unique.size and (unique[0] < 0 or unique[-1] >= self.vocab_size):
            raise TierquantError(f"token id out of range 0..{self.vocab_size - 1}")
        module = self.model.model.embed_tokens
        rows = self._rows("model.embed_tokens", module, unique)
        if row_transform is not None:
            rows = {k: row_transform(k, v) for k, v in rows.items()}
        held = self._swap(module, "model.embed_tokens.", rows, row_subset=True)
        try:
            h = module(mx.array(inverse.reshape(ids.shape).astype(np.int32)))
            mx.eval(h)
        finally:
            module.update(held)
        mx.clear_cache()
        return h

    def _rows(self, prefix: str, module, rows: np.ndarray | slice) -> dict[str, Any]:
        """Rows of each parameter of `module` (a row-indexed table: embedding, head)."""
        import mlx.core as mx
        from mlx.utils import tree_flatten

        out = {}
        for key, _ in tree_flatten(module.parameters()):
            name = f"{prefix}.{key}"
            if isinstance(rows, slice):
                raw = self.ckpt.read_rows(name, rows.start, rows.stop)
            else:
                raw = np.stack([self.ckpt.read_rows(name, int(r), int(r) + 1)[0] for r in rows])
            dtype = self.ckpt.info(name).dtype
            arr = mx.array(raw)
            out[name] = arr.view(mx.bfloat16) if dtype == "BF16" else arr
        return out

    def masks(self, hidden):
        """mlx-lm's own masks for a batch `hidden` [B, L, D]: (full, sliding window)."""
        from mlx_lm.models import gpt_oss

        full = gpt_oss.create_attention_mask(hidden, None)
        window = gpt_oss.create_attention_mask(hidden, None, window_size=self.window_size)
        return full, window

    def run_layer(
        self,
        index: int,
        hidden,
        *,
        batch_size: int,
        weights: dict[str, Any] | None = None,
        weight_overrides: dict[str, Any] | None = None,
        module_overrides: dict[str, Any] | None = None,
    ):
        """Decoder layer `index` over `hidden` [N, L, D], `batch_size` windows at a time.

        `weights`: the layer's parameters as `layer_weights(index)` gives them, for a caller
        that runs one layer many times (they are read once, on the first run, and stay
        resident while the caller holds them); default: read afresh and freed after.
        `module_overrides`: full module path → a module with its parameters set (e.g. an
        mlx-lm QuantizedLinear/QuantizedSwitchLinear at other bits) used for this run in
        place of the block's own, whose weights are then not read."""
        import mlx.core as mx
        from mlx.utils import tree_flatten

        prefix = f"model.layers.{index}."
        block = self.model.model.layers[index]
        weights = dict(weights) if weights is not None else self.layer_weights(index)
        for name, value in (weight_overrides or {}).items():
            if name not in weights:
                raise TierquantError(
                    f"weight override {name!r} is not a parameter of layer {index}"
                )
            weights[name] = value
        swapped = []
        for path, module in (module_overrides or {}).items():
            if not path.startswith(prefix):
                raise TierquantError(f"module override {path!r} is not in layer {index}")
            *parents, attr = path[len(prefix) :].split(".")
            parent = block
            for part in parents:
                parent = parent[part]
            if attr not in parent:
                raise TierquantError(f"module override {path!r} is not a module of the model")
            swapped.append((parent, attr, parent[attr]))
            parent[attr] = module
            weights = {k: v for k, v in weights.items() if not k.startswith(f"{path}.")}
            weights.update({f"{path}.{k}": v for k, v in tree_flatten(module.parameters())})
        held = self._swap(block, prefix, weights)
        del weights
        try:
            outs = []
            full, window = self.masks(hidden[:batch_size])
            mask = full if self.layer_types[index] == "full_attention" else window
            mx.eval(block.parameters())  # read and cast once, before the batches fan out
            # Batches round-robin over slice_streams(): MLX's CPU kernels are
            # single-threaded, so on the CPU two batches run on two cores at once (on a
            # GPU it is the one stream). Each batch is the same ops on the same inputs.
            streams = slice_streams()
            for k, start in enumerate(range(0, hidden.shape[0], batch_size)):
                with mx.stream(streams[k % len(streams)]):
                    outs.append(block(hidden[start : start + batch_size], mask))
                if len(outs) % len(streams) == 0:
                    mx.eval(outs[-len(streams) :])
            result = mx.concatenate(outs) if len(outs) > 1 else outs[0]
            mx.eval(result)
        finally:
            block.update(held)  # the lazy, never-read arrays: this layer's weights are freed
            for parent, attr, module in reversed(swapped):
                parent[attr] = module
        del outs
        mx.clear_cache()
        return result

    def forward(self, tokens: np.ndarray, *, batch_size: int):
        """Hidden states after the last decoder layer (before the final norm)."""
        h = self.embed(tokens)
        for i in range(self.num_layers):
            h = self.run_layer(i, h, batch_size=batch_size)
            log.debug("layer %d done", i)
        return h

    def logit_chunks(
        self,
        hidden,
        *,
        vocab_chunk: int | None = None,
        row_transform: RowTransform | None = None,
    ) -> Iterator[tuple[int, Any]]:
        """Final norm + lm_head over `hidden` [..., D] flattened to T tokens, yielding
        (first vocab id, float32 logits [T, C]) for consecutive slices of the vocabulary;
        only one slice of the head's rows is read and resident at a time.
        `row_transform(name, rows)` may replace each slice of the head's rows."""
        import mlx.core as mx

        x = self.model.model.norm(hidden.reshape(-1, hidden.shape[-1]))
        mx.eval(x)
        head = self.model.lm_head
        blas = mx.default_device() == mx.cpu and "bias" not in head
        x32 = np.array(x.astype(mx.float32)) if blas else None
        if vocab_chunk is None:
            vocab_chunk = vocab_chunk_for(x.shape[0], x.shape[-1])
        for start in range(0, self.vocab_size, vocab_chunk):
            stop = min(start + vocab_chunk, self.vocab_size)
            rows = self._rows("lm_head", head, slice(start, stop))
            if row_transform is not None:
                rows = {k: row_transform(k, v) for k, v in rows.items()}
            if blas:
                logits = mx.array(x32 @ _head_rows_float32(head, rows).T)
            else:
                held = self._swap(head, "lm_head.", rows, row_subset=True)
                try:
                    logits = head(x).astype(mx.float32)
                    mx.eval(logits)
                finally:
                    head.update(held)
            del rows
            yield start, logits
            del logits
            mx.clear_cache()

    def close(self) -> None:
        self.ckpt.close()

    def __enter__(self) -> StreamedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _head_rows_float32(head, rows: dict[str, Any]) -> np.ndarray:
    """A slice of lm_head's rows as float32 [C, D], dequantized as mlx-lm's QuantizedLinear
    does when the head is quantized: on the CPU backend the head's product runs in numpy's
    BLAS, ~25x faster than MLX's CPU matmul on Linux (2.2 vs 59 GFLOP/s for one vocab
    slice on this project's 2-core machine), for the same float32 product."""
    import mlx.core as mx

    w = rows["lm_head.weight"]
    if "lm_head.scales" in rows:  # float32 scales and biases, as the model computes with
        biases = rows.get("lm_head.biases")
        w = mx.dequantize(
            w,
            rows["lm_head.scales"].astype(mx.float32),
            None if biases is None else biases.astype(mx.float32),
            group_size=head.group_size,
            bits=head.bits,
            mode=getattr(head, "mode", "affine"),
        )
    return np.array(w.astype(mx.float32))
