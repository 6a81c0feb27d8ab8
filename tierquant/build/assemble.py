"""assemble stage: the tiers' shards → one stock mlx-lm model directory.

Each tier's shards are hard-linked (not copied: at 120B the experts tier alone is about
46 GB) into `data/model` under mlx-lm's global names `model-0000N-of-0000M.safetensors`,
beside an index, a config.json whose per-module `quantization` map (and
`quantization_config`) gives every matrix its tier's precision — the router and every
other bf16 module explicitly `false`, since mlx-lm's own gpt-oss predicate would make
the router 8-bit; the top-level defaults mlx-lm requires come from the largest quantized
tier, and a model with no quantized tier has no `quantization` at all — and the
tokenizer and generation files. The exact size per tier and
in total is counted from the tensors written and saved as DVC metrics (tierquant.plan.size's
layout, the same as predict's), with the per-module quantization error as a plot.
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import shutil
from pathlib import Path

from tierquant.build.manifest import read_manifest
from tierquant.core.checkpoint import INDEX_NAME, Checkpoint, shard_name
from tierquant.core.files import atomic_output, read_json, write_json
from tierquant.core.gptoss import copy_side_files, mlx_weights, shape_of_checkpoint
from tierquant.core.precision import Precision
from tierquant.errors import TierquantError
from tierquant.plan.size import format_table, size_report

log = logging.getLogger(__name__)


QUANTIZATION_KEYS = ("quantization", "quantization_config")


def quantization_map(
    tiers: dict[str, Precision], modules: dict[str, list[str]], params: dict[str, int]
) -> dict[str, object] | None:
    """config.json's `quantization` for mlx-lm: module -> its tier's entry (`false` for
    bf16), under top-level defaults (`group_size`, `bits`, `mode`, which mlx-lm's loader
    requires) taken from the quantized tier with the most params; None when no tier is
    quantized (a plain bf16 model, which must carry no `quantization` at all)."""
    quantized = [t for t in tiers if tiers[t].quantized]
    if not quantized:
        return None
    largest = max(quantized, key=lambda t: params[t])
    out: dict[str, object] = dict(tiers[largest].quantization() or {})
    for tier, names in modules.items():
        entry = tiers[tier].quantization() or False
        for module in names:
            out[module] = entry
    return out


def _link_or_copy(src: Path, dest: Path) -> str:
    try:
        os.link(src, dest)
        return "linked"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dest)
        return "copied"


def assemble_model(
    *,
    tiers: dict[str, Precision],
    quantized_dir: Path,
    original_dir: Path,
    out_dir: Path,
    size_metrics: Path,
    error_plot: Path,
) -> dict:
    """Link the tiers' shards into `out_dir` and write config, index and metrics; the
    config and side files are the original's (its `quantization_config` replaced)."""
    manifests = {t: read_manifest(quantized_dir, t, p) for t, p in tiers.items()}
    shape = shape_of_checkpoint(original_dir)
    weights = mlx_weights(shape)
    owner: dict[str, str] = {}
    for tier, manifest in manifests.items():
        for name in [*manifest["modules"], *manifest["vectors"]]:
            if name in owner:
                raise TierquantError(
                    f"{name} is in both tier {owner[name]!r} and tier {tier!r}; "
                    "rerun the plan stage"
                )
            owner[name] = tier
    for w in weights:
        key = w.module if w.is_matrix else w.name
        if key not in owner:
            raise TierquantError(
                f"{key} belongs to no tier in {quantized_dir} (tiers: {', '.join(tiers)}); "
                "every tier of the recipe needs a precision in `tiers`"
            )

    sources = [(t, s) for t, m in manifests.items() for s in m["shards"]]
    count = len(sources)
    weight_map: dict[str, str] = {}
    quantization = quantization_map(
        tiers,
        {t: m["modules"] for t, m in manifests.items()},
        {t: m["params"] for t, m in manifests.items()},
    )
    original_config = read_json(Path(original_dir) / "config.json")
    model_config = {k: v for k, v in original_config.items() if k not in QUANTIZATION_KEYS}
    if quantization is not None:
        model_config.update({key: quantization for key in QUANTIZATION_KEYS})
    with atomic_output(out_dir) as tmp:
        how = set()
        for k, (tier, shard) in enumerate(sources):
            name = shard_name(k, count)
            how.add(_link_or_copy(quantized_dir / tier / shard, tmp / name))
            for tensor, tensor_shard in manifests[tier]["tensors"].items():
                if tensor_shard == shard:
                    weight_map[tensor] = name
        with Checkpoint(tmp) as written:  # headers only: the exact bytes per tensor
            sizes = {n: i.nbytes for n, i in written.tensors.items()}
        write_json(
            tmp / INDEX_NAME,
            {
                "metadata": {"total_size": sum(sizes.values())},
                "weight_map": dict(sorted(weight_map.items())),
            },
        )
        write_json(tmp / "config.json", model_config)
        copy_side_files(original_dir, tmp)
    log.info(
        "wrote %s: %d shard(s) %s from %d tiers", out_dir, count, "/".join(sorted(how)), len(tiers)
    )

    tier_bytes = {t: sum(sizes[n] for n in m["tensors"]) for t, m in manifests.items()}
    assert sum(tier_bytes.values()) == sum(sizes[n] for n in weight_map)
    with Checkpoint(original_dir) as original:
        original_bytes = original.nbytes
    metrics = size_report(
        {t: (tiers[t].label, m["params"], tier_bytes[t]) for t, m in manifests.items()},
        original_bytes,
    )
    size_metrics.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(size_metrics, is_dir=False) as tmp_file:
        write_json(tmp_file, metrics)
    with atomic_output(error_plot, is_dir=False) as tmp_file:
        tmp_file.write_text(error_csv(manifests))
    for line in format_table(metrics):
        log.info("%s", line)
    return metrics


def error_csv(manifests: dict[str, dict]) -> str:
    """Per-module relative RMSE, for `dvc plots` (error by layer, one series per kind)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["module", "tier", "kind", "layer", "bits", "rel_rmse"])
    for tier, manifest in manifests.items():
        for module, entry in manifest["modules"].items():
            if entry.get("rel_rmse") is None:
                continue
            layer = entry["layer"] if entry["layer"] is not None else -1
            writer.writerow(
                [
                    module,
                    tier,
                    entry["kind"],
                    layer,
                    entry.get("bits", 16),
                    f"{entry['rel_rmse']:.6g}",
                ]
            )
    return out.getvalue()
