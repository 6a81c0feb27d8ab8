"""measure stage: the damage of each allocation group at each candidate precision, on the
calibration set, streamed layer by layer → data/measure/damage.json (+ a heatmap CSV).

The damage measure, and why. What the allocation minimises is the quantized model's
KL divergence from the original (validate's `kld_mean`), so damage is in those units:
nats per token, end to end:

    damage(group, p) = mean over calibration tokens of KL( P_original ‖ P_group at p )

with only that group quantized (at p) and every other tensor the original's. Streamed:
the group's layer runs with its modules quantized on the reference input h_i, and the
perturbed hidden state that leaves it is carried through every later layer (one layer's
weights resident: each layer advances every state carried from the groups before it),
then scored at the head (final norm + lm_head, in vocab slices). `embed_tokens` is its
fake-quantized embedding carried from the first layer; `lm_head` the head itself
quantized on the reference's last hidden state. The damages of several groups are
assumed to add: the plan's predicted damage is their sum (docs/allocation.md and
docs/tiny-model.md compare it with validate's measured kld_mean).

Why not cheaper. Until #28 the perturbation δ = block_i(h_i; group quantized) −
block_i(h_i) was added to the reference's LAST hidden state and scored there ("head-
projected layer-local"): the identity path only, the later layers' response dropped.
On the trained tiny model that under-estimates the groups of layers 0-3 by 2-4× (median;
up to 25×) and embed_tokens by ~900× (a 2-bit embedding: 6.4e-5 projected, 0.058 end
to end), because every later pre-norm layer sees δ relative to the small early
residual, not the large final one; recipe=auto then put the embedding at 2 bits and
lost to the hand recipes (docs/tiny-model.md).

Cost of carrying, and the window. One layer run per (group, candidate) where the group
acts, as before, plus one per later layer for each state carried (the states carried
into a layer run through it in one batched call); and the carried states' memory:
groups × candidates × calibration tokens × hidden × 4 bytes. End to end that is about
(L − 1)/2 more runs per state — at gpt-oss-120b's 36 layers ~18× the layer runs of the
layer-local measure — and a memory that grows with depth (~20 GB at the last layer at
16 × 128 calibration tokens). `carry_layers=k` (params `measure.carry_layers`) carries
each state k layers and then adds what is left of its perturbation (the state minus
the reference state there) to the reference's last hidden state: k + 1 runs per state,
at most k layers' states resident (flat in depth), end to end for the groups of the
last k layers; k=0 is the layer-local measure, None end to end (conf/'s default;
the real gpt-oss models set 1: docs/allocation.md).

Forwards run on the original (experts in mxfp4, as reference runs it). A decoder group
at a candidate is its modules swapped for mlx-lm's own quantized modules holding the
bytes quantize would write (`candidate_bytes`, `quantized_module`); the embedding and
head are fake-quantized; `mxfp4` experts and `bf16` are the original's bytes, damage 0.

Rounding (`rounding`, params `measure.rounding`): "rtn" scores mx.quantize's bytes;
"gptq" the bytes quantize_gptq@<tier> writes (tierquant.quality.hessian.gptq_rounded,
the same function): the inputs of each layer's matrices are recorded during its
reference run here (`LayerInputs.record`, quantize_gptq's own recording), lm_head's
from the reference's last hidden state (`HeadInputs.of`), so on the same calibration
windows the Hessians, and the bytes, are quantize_gptq's. The embedding stays round to
nearest (GPTQ is RTN for a one-hot input). The cost is one GPTQ per matrix per affine
candidate (docs/gptq.md: ~29-36 CPU-hours at gpt-oss-120b), hence rtn the default.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tierquant.core.files import atomic_output, json_bytes
from tierquant.quality.damage import DAMAGE, MEASURE_FORMAT
from tierquant.quality.klstats import row_lse64

log = logging.getLogger(__name__)

# The method's name in damage.json (the layer-local one before #28 was "head-projected
# layer-local KLD (tierquant.measure)").
MEASURE_NAME = "end-to-end KLD, each group's perturbation carried through the later layers"


def fake_quantize(w, precision):
    """`w` (bf16 mx array) quantized and dequantized at an affine `precision`."""
    import mlx.core as mx

    q, s, b = mx.quantize(w, group_size=precision.group_size, bits=precision.bits)
    out = mx.dequantize(q, s, b, group_size=precision.group_size, bits=precision.bits)
    return out.astype(w.dtype)


class HeadKL:
    """KL(P_ref ‖ Q) per candidate final hidden state, through the streamed head in vocab
    slices: KL = Σ_v p_v (a_v − b_v) − lse_a + lse_b (a, b: reference / candidate logits)."""

    def __init__(self, sm, h_last, vocab_chunk: int | None = None) -> None:
        self.sm, self.h, self.vocab_chunk = sm, h_last, vocab_chunk
        lse = np.full(h_last.shape[0], -np.inf)
        for _, logits in sm.logit_chunks(h_last, vocab_chunk=vocab_chunk):
            lse = np.logaddexp(lse, row_lse64(logits))
        self.lse_ref = lse

    def mean_kl(self, finals: Sequence[Any], row_transform=None) -> list[float]:
        """Mean KL over the tokens for each candidate final state [T, D] in `finals`
        (or, with `row_transform`, for the head's rows transformed, on h_last)."""
        import mlx.core as mx

        t = self.h.shape[0]
        stacked = mx.concatenate([self.h, *finals]) if finals else self.h
        k = len(finals)
        lse_ref = mx.array(self.lse_ref.astype(np.float32))[:, None]
        cross = np.zeros((max(k, 1), t))
        lse_b = np.full((max(k, 1), t), -np.inf)
        if row_transform is None:
            chunks = self.sm.logit_chunks(stacked, vocab_chunk=self.vocab_chunk)
            for _, logits in chunks:
                a = logits[:t]
                p = mx.exp(a - lse_ref)
                for c in range(k):
                    b = logits[(c + 1) * t : (c + 2) * t]
                    s = mx.sum(p * (a - b), axis=-1)
                    mx.eval(s)
                    cross[c] += np.array(s).astype(np.float64)
                    lse_b[c] = np.logaddexp(lse_b[c], row_lse64(b))
        else:  # the head itself transformed: reference rows and candidate rows, same h
            ref = self.sm.logit_chunks(self.h, vocab_chunk=self.vocab_chunk)
            cand = self.sm.logit_chunks(
                self.h, vocab_chunk=self.vocab_chunk, row_transform=row_transform
            )
            for (_, a), (_, b) in zip(ref, cand, strict=True):
                p = mx.exp(a - lse_ref)
                s = mx.sum(p * (a - b), axis=-1)
                mx.eval(s)
                cross[0] += np.array(s).astype(np.float64)
                lse_b[0] = np.logaddexp(lse_b[0], row_lse64(b))
            k = 1
        kl = cross[:k] - self.lse_ref[None, :] + lse_b[:k]
        return [float(max(0.0, np.mean(row))) for row in kl]


def measure_damage(
    *,
    original_dir: Path,
    tokens: np.ndarray,
    candidates: Sequence[Any],
    batch_size: int,
    carry_layers: int | None = None,
    vocab_chunk: int | None = None,
    rounding: str = "rtn",
) -> dict[str, dict[str, float]]:
    """Group name → {precision label: damage} on `tokens` [N, L] (module docstring), run
    on the original checkpoint `original_dir` (its config.json gives the groups' tensors:
    the float checkpoint's names and shapes). `candidates`: tierquant.core.precision.Precision.
    `carry_layers`: how many later layers a group's perturbed state is carried through
    before what is left of its perturbation is added to the reference's last hidden state
    and scored (None: to the last layer, end to end; 0: the head-projected layer-local
    measure). `rounding`: how a decoder group's affine candidates are rounded — "rtn"
    (mx.quantize's bytes, quantize@<tier>'s) or "gptq" (quantize_gptq@<tier>'s bytes, on
    Hessians recorded from the reference run of the group's layer on `tokens`, which
    must then be the calibration windows quantize_gptq reads)."""
    import mlx.core as mx

    from tierquant.core.checkpoint import Checkpoint
    from tierquant.core.gptoss import shape_of_checkpoint
    from tierquant.core.precision import BF16, ROUNDINGS
    from tierquant.quality.damage import allocation_groups
    from tierquant.quality.hessian import HeadInputs, LayerInputs
    from tierquant.quality.stream import StreamedModel, compute_dtype

    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    shape = shape_of_checkpoint(original_dir)
    groups, _ = allocation_groups(shape)
    affine = [p for p in candidates if p.mode == "affine"]
    out: dict[str, dict[str, float]] = {}

    def free(g) -> dict[str, float]:  # exactly lossless candidates
        zero = {p.label: 0.0 for p in candidates if p == BF16 or p.mode == "mxfp4"}
        return {k: v for k, v in zero.items() if g.allows(_by_label(candidates, k))}

    with (
        StreamedModel(original_dir, compute_dtype=compute_dtype()) as sm,
        Checkpoint(original_dir) as original,
    ):
        h0 = sm.embed(tokens)
        h = h0
        for i in range(sm.num_layers):
            h = sm.run_layer(i, h, batch_size=batch_size)
        d = h.shape[-1]
        h_last = h[:, :-1].reshape(-1, d)
        mx.eval(h_last)
        # lm_head's GPTQ Hessian, as quantize_gptq takes it (every position)
        head_inputs = HeadInputs.of(sm, h) if rounding == "gptq" else None
        del h
        head = HeadKL(sm, h_last, vocab_chunk)

        by_name = {g.name: g for g in groups}
        # Each (group, candidate) leaves a perturbed hidden state where it acts; it is
        # carried through the later layers (`carried`: name -> (layers carried, states),
        # advanced one resident layer at a time) until `carry_layers` of them, then
        # scored: its perturbation (state - the reference state there) added to the
        # reference's last hidden state. After the last layer that sum is the state itself.
        carried: dict[str, tuple[int, list[tuple[str, Any]]]] = {}

        def score_done(carried: dict, ref, final: bool = False) -> None:
            for name in [n for n, (k, _) in carried.items() if final or k == carry_layers]:
                _, states = carried.pop(name)
                finals = [h_last + (s - ref)[:, :-1].reshape(-1, d) for _, s in states]
                kl = head.mean_kl(finals)
                scored = dict(zip((label for label, _ in states), kl, strict=True))
                out[name] = {**scored, **free(by_name[name])}
                log.info("measured %s", name)

        # embed_tokens: its candidates' embeddings enter the first layer
        g = by_name["embed_tokens"]
        carried[g.name] = (
            0,
            [
                (p.label, sm.embed(tokens, row_transform=lambda _n, r, p=p: fake_quantize(r, p)))
                for p in affine
            ],
        )
        h = h0
        del h0
        score_done(carried, h)
        # decoder layers
        for i in range(sm.num_layers):
            # read once per layer, not once per candidate run (~25 runs a layer)
            weights = sm.layer_weights(i)

            def ref_run(i=i, h=h, weights=weights):
                return sm.run_layer(i, h, batch_size=batch_size, weights=weights)

            inputs = None  # the original's matrix inputs here: GPTQ's Hessians
            if rounding == "gptq":
                ref_out, inputs = LayerInputs.record(sm, i, ref_run)
            else:
                ref_out = ref_run()
            for name, (k, states) in carried.items():  # earlier groups' states, a layer on
                carried[name] = (
                    k + 1,
                    advance(sm, i, states, batch_size=batch_size, weights=weights),
                )
            for g in (x for x in groups if x.layer == i):
                # An expert group's own arrays are the layer's largest and its candidate
                # runs replace them: not resident meanwhile (candidate_rows reads the
                # original's MXFP4 rows a slice at a time).
                own = [k for k in weights if k.rsplit(".", 1)[0] in {w.module for w in g.weights}]
                biases = {k: weights[k] for k in own if k.endswith(".bias")}
                if g.is_experts:
                    for k in own:
                        if k not in biases:
                            del weights[k]
                    mx.clear_cache()
                states = []
                for p in affine:
                    modules = {
                        w.module: quantized_module(
                            w,
                            p,
                            candidate_bytes(
                                w, p, original=original, weights=weights, inputs=inputs
                            ),
                            biases.get(f"{w.module}.bias"),
                        )
                        for w in g.weights
                    }
                    mx.clear_cache()
                    y = sm.run_layer(
                        i, h, batch_size=batch_size, weights=weights, module_overrides=modules
                    )
                    del modules
                    states.append((p.label, y))
                if g.is_experts:  # back, to be read once more by the next group's first run
                    fresh = sm.layer_weights(i)
                    weights.update({k: fresh[k] for k in own if k not in biases})
                    del fresh
                carried[g.name] = (0, states)
                del states
            del weights, inputs
            h = ref_out
            score_done(carried, h)
            mx.clear_cache()
            log.info("measured layer %d (%d groups carried)", i, len(carried))
        score_done(carried, h, final=True)  # every state left is after the last layer
        del h, carried
        # lm_head: the head quantized, on the reference's last hidden states
        g = by_name["lm_head"]
        (w_head,) = g.weights
        out[g.name] = {
            p.label: head.mean_kl(
                [],
                row_transform=(
                    (lambda _n, rows, p=p: fake_quantize(rows, p))
                    if head_inputs is None
                    else gptq_head_rows(original, head_inputs, w_head, p)
                ),
            )[0]
            for p in affine
        }
        del head_inputs
        out[g.name].update(free(g))
        log.info("measured %s", g.name)
    return {g.name: out[g.name] for g in groups}


def advance(sm, index: int, states, *, batch_size: int, weights):
    """[(label, hidden [N, L, D])] → the same after decoder layer `index` (its resident
    `weights`), all states in one run_layer call (they are windows like any other)."""
    import mlx.core as mx

    if not states:
        return states
    n = states[0][1].shape[0]
    y = sm.run_layer(
        index, mx.concatenate([s for _, s in states]), batch_size=batch_size, weights=weights
    )
    return [(label, y[k * n : (k + 1) * n]) for k, (label, _) in enumerate(states)]


def candidate_rows(weight, *, original, weights: dict[str, Any]):
    """`rows(start, stop)`: slices of `weight` (a tierquant.core.gptoss.Weight) as the float
    checkpoint's bf16, for `quantize_rows`. An expert matrix's MXFP4 rows are read from
    the `original` checkpoint (tierquant.core.checkpoint.Checkpoint) a slice at a time and
    decoded by convert's own decoder: exactly the float checkpoint's bits, at a quarter
    of their bytes. Any other matrix is the layer's resident bf16 parameter in `weights`
    (`StreamedModel.layer_weights`), the same array the float checkpoint holds."""
    from tierquant.core.affine import expert_rows
    from tierquant.core.gptoss import EXPERT_KINDS
    from tierquant.core.parallel import slice_streams

    if weight.kind in EXPERT_KINDS:
        return expert_rows(original, weight, depth=len(slice_streams()))  # quantize_rows's
    stored = weights[f"{weight.module}.weight"]
    return lambda start, stop: stored[start:stop]


def candidate_bytes(weight, precision, *, original, weights: dict[str, Any], inputs=None):
    """(packed, scales, biases) as mx arrays: the bytes the quantize stage writes for
    `weight` at an affine `precision`. Round to nearest (`quantize_rows` of
    `candidate_rows`: quantize@<tier>'s), or with `inputs` (the layer's
    tierquant.quality.hessian.LayerInputs) GPTQ's: `gptq_rounded`, quantize_gptq@<tier>'s
    own rule, each expert of a stack on its blended Hessian."""
    import mlx.core as mx

    from tierquant.core.affine import quantize_rows
    from tierquant.quality.hessian import gptq_rounded

    if inputs is None:
        rows = candidate_rows(weight, original=original, weights=weights)
        return quantize_rows(rows, weight.shape, precision)
    parts = [q for _, q in gptq_rounded(original, inputs, weight, precision)]
    stacked = [np.stack(a) if len(weight.shape) == 3 else a[0] for a in zip(*parts, strict=True)]
    packed, scales, biases = stacked
    # scales and biases come as bf16 bit patterns (numpy has no bfloat16)
    return (
        mx.array(packed),
        mx.array(scales).view(mx.bfloat16),
        mx.array(biases).view(mx.bfloat16),
    )


def gptq_head_rows(original, inputs, weight, precision):
    """A `row_transform` for the streamed head (StreamedModel.logit_chunks): lm_head's
    rows as the bytes quantize_gptq writes for it at `precision` (`gptq_rounded` on
    `inputs`, its HeadInputs) dequantize to with float32 scales and biases, as the
    quantized model computes (stream._head_rows_float32; bf16 values were 0.7% off
    its KL on the tiny random model). The slices come in vocabulary order: each call
    takes the next rows, GPTQ-rounded as they are first needed."""
    import mlx.core as mx

    from tierquant.quality.hessian import gptq_rounded

    g, bits = precision.group_size, precision.bits
    parts = gptq_rounded(original, inputs, weight, precision)  # lazily, in row order
    pending: list = []  # dequantized rows made but not yet handed out

    def transform(name: str, rows):
        if name != f"{weight.module}.weight":
            return rows
        need = rows.shape[0]
        # GPTQ chunks are made as the vocab slices reach them: at most one chunk and
        # one slice resident, never the whole head (2.3 GB of float32 at gpt-oss)
        while sum(x.shape[0] for x in pending) < need:
            _, (packed, scales, biases) = next(parts)
            s, b = (mx.array(a).view(mx.bfloat16).astype(mx.float32) for a in (scales, biases))
            pending.append(mx.dequantize(mx.array(packed), s, b, group_size=g, bits=bits))
        block = pending[0] if len(pending) == 1 else mx.concatenate(pending)
        out, rest = block[:need], block[need:]
        mx.eval(out, rest)
        pending[:] = [rest] if rest.shape[0] else []
        return out

    return transform


def quantized_module(weight, precision, qweights, bias):
    """mlx-lm's quantized module for `weight` at an affine `precision`, holding
    `qweights` = (packed, scales, biases) (see `candidate_bytes`), with `bias` (or None)."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    wq, q_scales, q_biases = qweights
    *experts, out_dims, in_dims = weight.shape
    kw = {"group_size": precision.group_size, "bits": precision.bits, "mode": "affine"}
    if experts:
        module = QuantizedSwitchLinear(in_dims, out_dims, experts[0], bias is not None, **kw)
    else:
        module = nn.QuantizedLinear(in_dims, out_dims, bias is not None, **kw)
    params = {"weight": wq, "scales": q_scales, "biases": q_biases}
    if bias is not None:
        params["bias"] = bias
    module.update(params)
    return module


def _by_label(candidates, label):
    return next(p for p in candidates if p.label == label)


def heatmap_csv(groups: dict[str, dict[str, Any]]) -> str:
    """One row per (group, precision): layer (-1 embed, L lm_head), group, precision,
    damage and log10 damage, for the `dvc plots` heatmap."""
    layers = [e["layer"] for e in groups.values() if e["layer"] is not None]
    last = max(layers) + 1 if layers else 0
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "group", "precision", "damage", "log10_damage"])
    for name, entry in groups.items():
        layer = entry["layer"]
        layer = -1 if name == "embed_tokens" else last if layer is None else layer
        for label, value in entry["damage"].items():
            log10 = math.log10(value) if value > 0 else -9.0
            w.writerow([layer, entry["kind"], label, f"{value:.6g}", f"{log10:.4f}"])
    return buf.getvalue()


def measure(
    *,
    original: Path,
    windows: Path,
    candidates: Sequence[object],
    group_size: int,
    batch_size: int,
    out: Path,
    plot: Path,
    carry_layers: int | None = None,
    rounding: str = "rtn",
) -> dict[str, Any]:
    """The measure stage: the calibration windows (`windows`, from the calibration stage)
    → damage of every group × candidate, its affine candidates rounded by `rounding`
    (rtn or gptq: `measure_damage`) → `out/damage.json` and the heatmap CSV `plot`."""
    import mlx.core as mx

    from tierquant.core.gptoss import shape_of_checkpoint
    from tierquant.core.precision import parse_candidates
    from tierquant.quality.damage import allocation_groups
    from tierquant.quality.stream import compute_dtype
    from tierquant.quality.windows import read_windows

    precisions = parse_candidates(candidates, group_size)
    tokens = read_windows(Path(windows))
    log.info("calibration set: %d windows × %d tokens", *tokens.shape)
    mx.reset_peak_memory()
    damage = measure_damage(
        original_dir=Path(original),
        tokens=tokens,
        candidates=precisions,
        batch_size=batch_size,
        carry_layers=carry_layers,
        rounding=rounding,
    )
    groups, _ = allocation_groups(shape_of_checkpoint(Path(original)))
    report = {
        "format": MEASURE_FORMAT,
        "measure": MEASURE_NAME,
        "unit": "nats/token (mean KL divergence from the unquantized model)",
        "group_size": group_size,
        "candidates": [p.label if p.mode != "affine" else p.bits for p in precisions],
        "calibration": {"num_windows": int(tokens.shape[0]), "window_length": int(tokens.shape[1])},
        "carry_layers": carry_layers,
        "rounding": rounding,
        "compute_dtype": compute_dtype(),
        "groups": {
            g.name: {
                "kind": g.kind,
                "layer": g.layer,
                "tensors": [w.name for w in g.weights],
                "damage": damage[g.name],
            }
            for g in groups
        },
    }
    peak = int(mx.get_peak_memory())
    with atomic_output(Path(out)) as tmp:
        (tmp / DAMAGE).write_bytes(json_bytes(report))
    with atomic_output(Path(plot), is_dir=False) as tmp:
        tmp.write_text(heatmap_csv(report["groups"]))
    log.info(
        "wrote %s: %d groups × %d candidates (MLX peak %.1f MB)",
        out,
        len(groups),
        len(precisions),
        peak / 1e6,
    )
    return report
