"""dmm: merge many fine-tuned diffusion checkpoints into one style-promptable model."""

__version__ = "0.1.0"

# Named at top level so that a stock `DiffusionPipeline.from_pretrained(merged_folder)` resolves the
# merged UNet ("unet": ["dmm", "StyleUNet2DConditionModel"] in model_index.json): diffusers looks the
# class up in the named library and checks it against that library's `ModelMixin`.
from diffusers import ModelMixin  # noqa: E402

from dmm.models.student import StyleUNet2DConditionModel  # noqa: E402

__all__ = ["ModelMixin", "StyleUNet2DConditionModel", "__version__"]
