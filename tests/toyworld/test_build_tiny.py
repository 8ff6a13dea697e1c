import json

import pytest
import torch

from dmm.toyworld import load_world
from dmm.toyworld.build import main


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_tiny_build_end_to_end(tmp_path, arch):
    out = tmp_path / "world"
    main(["--out", str(out), "--arch", arch, "--scale", "tiny", "--styles", "flat,neon", "--seed", "1",
          "--cache", str(tmp_path / "cache"), "--no-progress"])
    meta = json.loads((out / "world.json").read_text())
    assert meta["arch"] == arch and meta["styles"] == ["flat", "neon"]
    assert set(meta["metrics"]["own_style_accuracy"]) == {"flat", "neon"}
    assert all(k in meta["timings_s"] for k in ("clip", "vae", "base", "teacher_flat", "teacher_neon"))
    world = load_world(out)
    assert world.arch == arch and world.style_names == ["flat", "neon"]
    pipe = world.load_pipeline("neon")
    expected = "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline"
    assert type(pipe).__name__ == expected
    assert pipe.unet.dtype == torch.float32
    image = pipe(world.prompts(1, seed=0), num_inference_steps=2, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    if arch == "sdxl":
        assert pipe.unet.config.addition_embed_type == "text_time"
        assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size * 2
        assert pipe.config.force_zeros_for_empty_prompt is False
    else:
        assert pipe.unet.config.addition_embed_type is None
    # a finished stage is not redone: a second build reuses the cache and gives the same weights
    before = (out / "teachers/neon/unet/diffusion_pytorch_model.safetensors").read_bytes()
    main(["--out", str(out), "--arch", arch, "--scale", "tiny", "--styles", "flat,neon", "--seed", "1",
          "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert (out / "teachers/neon/unet/diffusion_pytorch_model.safetensors").read_bytes() == before
