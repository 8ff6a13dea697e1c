"""The three DMM losses, one file each."""

from dmm.losses.adversarial import discriminator_loss, generator_loss
from dmm.losses.feature import feature_imitation_loss
from dmm.losses.score import score_distillation_loss

__all__ = ["discriminator_loss", "feature_imitation_loss", "generator_loss", "score_distillation_loss"]
