"""One caption encoder: the trainer's frozen pipeline and the toy world's caption table agree."""
import pytest
import torch

from dmm.conditioning import FrozenPipeline, encode_prompts
from dmm.testing import make_tiny_pipeline
from dmm.toyworld.conditioning import encode_captions

CAPTIONS = ["a red circle", "a blue square on the left", ""]


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_toy_table_and_frozen_pipeline_use_one_encoder(tmp_path, arch):
    pipe = make_tiny_pipeline(tmp_path / "base", arch)
    embeds, pooled = encode_prompts(pipe, CAPTIONS)
    assert embeds.shape[0] == len(CAPTIONS)
    assert (pooled is not None) == (arch == "sdxl")  # SDXL detected from the UNet, through the arch map

    table = encode_captions(pipe, CAPTIONS[:2], resolution=16)
    assert table.empty_index == 2 and len(table.prompt_embeds) == 3
    torch.testing.assert_close(table.prompt_embeds, embeds.float())
    frozen = FrozenPipeline(tmp_path / "base", resolution=16)
    cond = frozen.encode_captions(CAPTIONS)
    torch.testing.assert_close(cond.encoder_hidden_states, embeds, rtol=1e-5, atol=1e-6)
    if arch == "sdxl":
        torch.testing.assert_close(table.pooled, pooled.float())
        torch.testing.assert_close(cond.added_cond_kwargs["text_embeds"], pooled, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cond.added_cond_kwargs["time_ids"][0], table.time_ids)
    else:
        assert table.pooled is None and table.time_ids is None and cond.added_cond_kwargs is None
