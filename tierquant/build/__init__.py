"""Bytes of the quantized model: each tier quantized from the original into its shards
and manifest, then the tiers assembled into one stock mlx-lm model directory."""
