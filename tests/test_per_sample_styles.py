"""Styles per image through stock pipelines: `unet.set_style([...])` with one style per image gives
each image exactly what generating it alone gives, with and without classifier-free guidance and
with `num_images_per_prompt`; a list that does not fit the batch is refused naming both sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmm.pipeline import load_merged
from tests.test_load_anywhere import make_merged

MIX = {"neon": 0.5, "flat": 0.5}
STEPS = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = load_merged(make_merged(tmp_path_factory.mktemp("per_sample")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompts, style, seeds, guidance, per_prompt=1):
    pipe.unet.set_style(style)
    return pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], guidance_scale=guidance,
                num_images_per_prompt=per_prompt, **STEPS).images


@pytest.mark.parametrize("guidance", [3.0, 1.0], ids=["cfg", "no-cfg"])
def test_each_image_equals_its_solo_generation(pipe, guidance):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    styles = ["neon", "flat", MIX]
    batch = run(pipe, prompts, styles, [0, 1, 2], guidance)
    for k in range(3):
        solo = run(pipe, prompts[k], styles[k], [k], guidance)
        np.testing.assert_allclose(batch[k], solo[0], atol=1e-4, err_msg=f"image {k} ({styles[k]})")
    assert np.abs(batch[0] - run(pipe, prompts[0], "flat", [0], guidance)[0]).max() > 1e-3, "styles differ"


def test_num_images_per_prompt_takes_one_style_per_image(pipe):
    prompts = ["a red circle", "a blue square"]
    styles = ["neon", MIX, "flat", "neon"]  # prompt 0's two images, then prompt 1's
    batch = run(pipe, prompts, styles, [0, 1, 2, 3], 3.0, per_prompt=2)
    for j in range(4):
        solo = run(pipe, prompts[j // 2], styles[j], [j], 3.0)
        np.testing.assert_allclose(batch[j], solo[0], atol=1e-4, err_msg=f"image {j}")


def test_a_list_that_does_not_fit_the_batch_names_both_sizes(pipe):
    with pytest.raises(ValueError, match=r"given 3 per-image styles.*batch of 4"):
        run(pipe, ["a red circle", "a blue square"], ["neon", "flat", "neon"], [0, 1], 3.0)


@pytest.mark.parametrize("styles, message", [
    (["neon", "pixel"], r"unknown style 'pixel'; known styles: \['neon', 'flat'\]"),
    (["neon", {"neon": 1.5, "flat": -0.5}], "non-negative"),
    (["neon", {"neon": 0.5, "flat": 0.2}], "sum to 1"),
])
def test_bad_per_image_styles_are_refused_when_set(pipe, styles, message):
    with pytest.raises(ValueError, match=message):
        pipe.unet.set_style(styles)
