import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from dmm.testing import tiny_unet_config  # noqa: E402


@pytest.fixture(params=["sdxl", "sd15"])
def arch(request):
    return request.param


@pytest.fixture
def tiny_unet(arch):
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config(arch))


def unet_inputs(unet, batch=2, seed=0):
    """Random but valid inputs for a tiny UNet of either architecture."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(batch, 4, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ehs = torch.randn(batch, 5, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * batch, dtype=torch.float32),
        }
    return x, t, ehs, kwargs
