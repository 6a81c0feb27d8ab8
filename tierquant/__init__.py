"""tierquant: tiered mixed-precision MLX quantization of gpt-oss checkpoints."""

import time

# When this process began importing tierquant: every stage script imports it first, so a
# stage's logged time (tierquant.stage) includes its imports (mlx, mlx-lm, hydra), which
# are the stage's cost, not DVC's.
IMPORTED_AT = time.perf_counter()


__version__ = "0.1.0"
