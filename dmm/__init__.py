"""dmm: merge many fine-tuned diffusion checkpoints into one style-promptable model."""

__version__ = "0.1.0"
