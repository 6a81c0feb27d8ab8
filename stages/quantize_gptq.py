"""quantize_gptq@<tier>: one tier, its affine matrices rounded by GPTQ → data/quantized/<tier>.

Exists instead of quantize@<tier> when quant.rounding is gptq (dvc.yaml: the foreach
lists in quant.stages). Same output, same layout and sizes as quantize@<tier>; its extra
inputs are the calibration windows (paths.calibration), from which the Hessians of the
ORIGINAL model's matrix inputs are recomputed for this tier's layers.

Run by hand as `python stages/quantize_gptq.py tier=experts [key=value ...]`.
"""

from pathlib import Path

from tierquant.build.gptq import quantize_gptq
from tierquant.config import Config
from tierquant.stage import stage_main


def run(config: Config, tier: str) -> None:
    """Quantize the tier's tensors (its plan file) at tiers.<tier> into paths.quantized/<tier>,
    its affine matrices by GPTQ on paths.calibration (calibration.batch_size windows a run)."""
    quantize_gptq(
        tier=tier,
        tiers=config.precisions(),
        plan_dir=Path(config.paths.plan),
        original_dir=Path(config.paths.original),
        out_dir=Path(config.paths.quantized) / tier,
        max_shard_bytes=config.model.max_shard_bytes,
        calibration=Path(config.paths.calibration),
        batch_size=config.calibration.batch_size,
    )


if __name__ == "__main__":
    stage_main(run, stage_args=("tier",))()
