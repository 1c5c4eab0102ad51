"""Stable Diffusion 1.5 scale: loading iCD checkpoints, metrics and experiments at full size."""
