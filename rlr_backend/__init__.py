"""rlr_backend: reward fine-tuning of diffusion models (RLR, DDPO, backprop baselines)."""

__version__ = "0.1.0"
