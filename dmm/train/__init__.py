"""Training: the distillation trainer, checkpoints, teacher layout and export."""
