"""The inputs each matrix of the ORIGINAL model sees on the calibration windows, layer by
layer, and the GPTQ Hessians built from them (tierquant.core.gptq).

`LayerInputs.stream(original_dir, tokens, ...)` runs the original checkpoint (experts in
MXFP4, as reference and measure run it) over the calibration windows with the streamed
forward (tierquant.quality.stream: one layer's weights resident, the windows' hidden
states carried) and yields, for each layer asked for, what its matrices read:

- q_proj, k_proj, v_proj: the layer's normed input (input_layernorm(h)), one set of rows;
- o_proj: the attention output it projects;
- each expert's gate_proj and up_proj: the normed MLP input of the tokens the router
  sends to that expert (top-k), and its down_proj: that expert's SwiGLU activations on
  them;
- and, with `head=True`, after the last layer: lm_head's input, the final norm of the
  last hidden state (`HeadInputs`).

measure (measure.rounding=gptq) records the same inputs during its own reference run
of each layer (`LayerInputs.record`, `HeadInputs.of`) and rounds its candidates with the
same `gptq_rounded`, so it scores exactly the bytes quantize_gptq writes.

They are recorded from mlx-lm's own modules during the layer's run (a module's class is
swapped, for that run only, for a subclass that keeps its input), so the inputs are
exactly what the original's forward computes, never the output of a quantized layer:
the Hessians of one tier do not depend on how another tier is rounded.

Memory: one layer's weights (the stream) plus that layer's recorded inputs, held as
float32 rows: calibration tokens × (hidden + heads·head_dim + k·(hidden + intermediate))
× 4 B (2048 tokens at gpt-oss-120b: ~0.3 GB); the Hessians are made one matrix (one
expert) at a time from them (`hessian`), so the 2 × 128 experts' 2880² Hessians of a
layer (~17 GB in float64) are never held together.

An expert with few routed tokens (N, against its input width `in`) gets GPTQ on the blend
α·Ĥ_expert + (1 − α)·Ĥ_pooled of per-token Hessians with α = N / (N + in): the layer's
pooled Hessian (every routed token of every expert) as a prior worth `in` tokens; no
routed token at all: the pooled one (docs/gptq.md has the measurement behind this).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from tierquant.core.floatrows import read_expert_bf16
from tierquant.core.gptoss import EXPERT_KINDS
from tierquant.core.gptq import HessianAccumulator, gptq_quantize, inverse_hessian_factor
from tierquant.core.mxfp4 import from_bf16_bits

if TYPE_CHECKING:
    from tierquant.core.checkpoint import Checkpoint
    from tierquant.core.gptoss import Weight
    from tierquant.core.precision import Precision

log = logging.getLogger(__name__)

T = TypeVar("T")

DAMP = 0.01  # × mean(diag H), added to H's diagonal (AutoGPTQ's default)
HEAD_ROWS = 8192  # lm_head rows per GPTQ call: 94 MB of float32 at gpt-oss's 2880
ATTENTION_IN = ("q_proj", "k_proj", "v_proj")  # read the layer's normed input
EXPERT_IN = ("gate_proj", "up_proj")  # read the routed normed MLP input
# module recorded (relative to the layer) -> what it is
RECORDED = {
    "self_attn.q_proj": "attention",
    "self_attn.o_proj": "o_proj",
    "mlp.experts.gate_proj": "experts",
    "mlp.experts.down_proj": "down_proj",
}


def expert_rows(x, indices) -> tuple[np.ndarray, np.ndarray]:
    """(rows [R, width] float32, expert id of each row [R]) from the (x, indices) an
    mlx-lm SwitchLinear receives, sorted by expert (SwitchGLU's `_gather_sort`: x
    [T·k, 1, width], indices [T·k]) or not (x [..., 1 or k, 1, width], indices [..., k])."""
    import mlx.core as mx

    width = x.shape[-1]
    rows = mx.broadcast_to(x, (*indices.shape, *x.shape[-2:])).reshape(-1, width)
    ids = np.array(indices.reshape(-1).astype(mx.int32))
    return np.array(rows.astype(mx.float32)), ids


@dataclass
class LayerInputs:
    """One layer's recorded inputs (float32 rows) and how to make each matrix's Hessian."""

    layer: int
    attention: np.ndarray  # [T, hidden]: q/k/v's input
    o_proj: np.ndarray  # [T, heads·head_dim]
    experts: np.ndarray  # [R, hidden]: gate/up input, one row per (token, routed expert)
    down_proj: np.ndarray  # [R, intermediate]: down's input, same rows
    expert_ids: np.ndarray  # [R]
    # the layer's pooled per-token Hessians, made once (gate/up input, down input)
    pooled: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    dense: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # q/k/v's, o's

    def routed(self, expert: int) -> int:
        """Tokens the router sent to `expert` on the calibration windows."""
        return int(np.count_nonzero(self.expert_ids == expert))

    def hessian(
        self, kind: str, expert: int | None = None, alpha: float | None = None
    ) -> np.ndarray:
        """H (float64, in × in) for a matrix of `kind` (q/k/v/o_proj, gate/up/down_proj);
        an expert matrix's for `expert`: per-token mean, blended with the layer's pooled
        one by the routed-token count (module docstring). `alpha` overrides the blend's
        weight on the expert's own Hessian (bench/gptq_experts.py compares them)."""
        if kind in (*ATTENTION_IN, "o_proj"):
            # made once a layer: q/k/v share it, and measure rounds each candidate with it
            key = "o_proj" if kind == "o_proj" else "attention"
            if key not in self.dense:
                self.dense[key] = _sum_xtx(getattr(self, key))
            return self.dense[key]
        if kind not in (*EXPERT_IN, "down_proj") or expert is None:
            raise ValueError(f"no Hessian for kind {kind!r} (expert {expert})")
        key = "experts" if kind in EXPERT_IN else "down_proj"
        rows = self.experts if key == "experts" else self.down_proj
        if key not in self.pooled:
            self.pooled[key] = _mean_xtx(rows)
        pooled = self.pooled[key]
        own = rows[self.expert_ids == expert]
        n, width = own.shape[0], rows.shape[1]
        if alpha is None:
            alpha = n / (n + width)
        if n == 0 or alpha == 0:
            return pooled
        return alpha * _mean_xtx(own) + (1 - alpha) * pooled

    @classmethod
    def stream(
        cls,
        original_dir: Path,
        tokens: np.ndarray,
        *,
        batch_size: int,
        layers: set[int],
        head: bool = False,
    ) -> Iterator[LayerInputs | HeadInputs]:
        """Run the original over `tokens` [N, L] layer by layer (one layer resident) and
        yield the inputs of each layer in `layers`, in order, then (`head`) lm_head's
        `HeadInputs`; stops after the last thing asked for."""
        import mlx.core as mx

        from tierquant.quality.stream import StreamedModel, compute_dtype

        with StreamedModel(Path(original_dir), compute_dtype=compute_dtype()) as sm:
            last = sm.num_layers - 1 if head else max(layers, default=-1)
            h = sm.embed(tokens)
            for i in range(last + 1):
                if i not in layers:
                    h = sm.run_layer(i, h, batch_size=batch_size)
                    continue
                h, inputs = cls.record(
                    sm, i, lambda i=i, h=h: sm.run_layer(i, h, batch_size=batch_size)
                )
                mx.clear_cache()
                log.info("layer %d: inputs of %d tokens recorded", i, inputs.attention.shape[0])
                yield inputs
            if head:
                yield HeadInputs.of(sm, h)

    @classmethod
    def record(cls, sm, layer: int, run: Callable[[], T]) -> tuple[T, LayerInputs]:
        """`run()` (a run of decoder layer `layer` of the StreamedModel `sm` on the
        ORIGINAL's weights) and the inputs its matrices read meanwhile: the one way
        both quantize_gptq (`stream`) and measure (gptq-scored candidates) record them."""
        block = sm.model.model.layers[layer]
        with recording(_module(block, path) for path in RECORDED) as records:
            out = run()
            inputs = cls._collect(layer, dict(zip(RECORDED.values(), records, strict=True)))
        return out, inputs

    @classmethod
    def _collect(cls, layer: int, records: dict[str, list[tuple[Any, Any]]]) -> LayerInputs:
        import mlx.core as mx

        def rows(name: str) -> np.ndarray:
            xs = [x.reshape(-1, x.shape[-1]).astype(mx.float32) for x, _ in records[name]]
            return np.concatenate([np.array(x) for x in xs])

        experts = [expert_rows(x, idx) for x, idx in records["experts"]]
        down = [expert_rows(x, idx) for x, idx in records["down_proj"]]
        ids = np.concatenate([i for _, i in experts])
        if not np.array_equal(ids, np.concatenate([i for _, i in down])):
            raise RuntimeError(f"layer {layer}: gate and down inputs routed differently")
        return cls(
            layer=layer,
            attention=rows("attention"),
            o_proj=rows("o_proj"),
            experts=np.concatenate([r for r, _ in experts]),
            down_proj=np.concatenate([r for r, _ in down]),
            expert_ids=ids,
        )


@dataclass
class HeadInputs:
    """lm_head's input on the calibration windows: the final norm of the last hidden
    state, [T, hidden] float32. `layer` is None, as lm_head's."""

    rows: np.ndarray
    layer: None = None

    @classmethod
    def of(cls, sm, h) -> HeadInputs:
        """From the last hidden state `h` [N, L, D] of the ORIGINAL (the StreamedModel
        `sm`'s run over the calibration windows): the one way quantize_gptq (`stream`)
        and measure (a gptq-scored lm_head) take it. Every position, the last included."""
        import mlx.core as mx

        x = sm.model.model.norm(h.reshape(-1, h.shape[-1])).astype(mx.float32)
        return cls(np.array(x))

    def hessian(self, kind: str, expert: int | None = None) -> np.ndarray:
        if kind != "lm_head" or expert is not None:
            raise ValueError(f"no head Hessian for kind {kind!r} (expert {expert})")
        return _sum_xtx(self.rows)


def gptq_rounded(
    original: Checkpoint,
    inputs: LayerInputs | HeadInputs,
    w: Weight,
    precision: Precision,
) -> Iterator[tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """GPTQ of `w` at an affine `precision` against its Hessian from `inputs`, in parts
    in row order: an attention matrix whole, each expert of an [E, out, in] stack on its
    blended Hessian, lm_head by HEAD_ROWS rows sharing one factor (rows are independent
    given H; bytes equal to one whole-matrix GPTQ). Yields (the part's float32 weight,
    (packed, scales, biases)) as gptq_quantize gives them. The one rule for these bytes:
    quantize_gptq writes them, measure scores them."""
    experts = w.shape[0] if w.kind in EXPERT_KINDS else None
    factor = hessian = None
    if experts is not None:
        parts = [(e, e + 1) for e in range(experts)]
    else:
        chunk = HEAD_ROWS if w.kind == "lm_head" else w.shape[0]
        parts = [(r, min(r + chunk, w.shape[0])) for r in range(0, w.shape[0], chunk)]
        hessian = inputs.hessian(w.kind)
        factor = inverse_hessian_factor(hessian, DAMP) if len(parts) > 1 else None
    for start, stop in parts:
        if experts is None:
            bf16 = original.read_rows(w.name, start, stop)
        else:
            bf16 = read_expert_bf16(original, w, start, stop)[0]
            hessian = inputs.hessian(w.kind, start)
        weight = from_bf16_bits(bf16)
        yield (
            weight,
            gptq_quantize(
                weight,
                hessian,
                bits=precision.bits,
                group_size=precision.group_size,
                damp=DAMP,
                factor=factor,
            ),
        )


def _module(block, path: str):
    module = block
    for part in path.split("."):
        module = module[part]
    return module


def _sum_xtx(rows: np.ndarray) -> np.ndarray:
    acc = HessianAccumulator(rows.shape[1])
    acc.add(rows)
    return acc.sum


def _mean_xtx(rows: np.ndarray) -> np.ndarray:
    acc = HessianAccumulator(rows.shape[1])
    acc.add(rows)
    return acc.mean


_RECORDING_CLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """`cls` with a __call__ that appends (input, second argument or None) to the
    instance's `_tq_records` list before calling `cls`'s own."""
    if cls not in _RECORDING_CLASSES:

        def __call__(self, x, *args, **kwargs):  # noqa: N807
            self.__dict__["_tq_records"].append((x, args[0] if args else None))
            return cls.__call__(self, x, *args, **kwargs)

        _RECORDING_CLASSES[cls] = type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})
    return _RECORDING_CLASSES[cls]


@contextmanager
def recording(modules) -> Iterator[list[list[tuple[Any, Any]]]]:
    """While inside, each of `modules` (mlx-lm modules of the model) records every call's
    input (and a SwitchLinear's expert indices) in its list; the modules, their
    parameters and their names are unchanged (a class swap, undone on exit)."""
    modules = list(modules)
    records: list[list[tuple[Any, Any]]] = [[] for _ in modules]
    originals = [type(m) for m in modules]
    try:
        for m, rec in zip(modules, records, strict=True):
            m.__dict__["_tq_records"] = rec  # not an attribute MLX sees as a parameter
            m.__class__ = _recording_class(type(m))
        yield records
    finally:
        for m, cls in zip(modules, originals, strict=True):
            m.__class__ = cls
            m.__dict__.pop("_tq_records", None)
