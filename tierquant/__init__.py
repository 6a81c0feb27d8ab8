"""tierquant: tiered mixed-precision MLX quantization of gpt-oss checkpoints."""

__version__ = "0.1.0"
