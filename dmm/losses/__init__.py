"""The losses, one file each: the three DMM losses and the few-step stage's consistency distance."""

from dmm.losses.adversarial import discriminator_loss, generator_loss
from dmm.losses.consistency import pseudo_huber_loss
from dmm.losses.feature import feature_imitation_loss
from dmm.losses.score import score_distillation_loss

__all__ = ["discriminator_loss", "feature_imitation_loss", "generator_loss", "pseudo_huber_loss",
           "score_distillation_loss"]
