"""One seed per image (dmm.sampling), sampling settings refused before sampling, load_merged from anywhere."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmm.sampling import SamplingError, sample_images
from eval.suite import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from dmm.testing import make_tiny_pipeline

    pipe = make_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "p", arch="sd15", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_an_image_does_not_depend_on_batch_size(tiny_pipe):
    prompts, seeds = ["a red circle", "a blue square", "a green triangle"], [7, 8, 9]
    settings = dict(steps=3, guidance_scale=3.0, output_type="np")
    batched = sample_images(tiny_pipe, prompts, seeds, batch_size=3, **settings)
    alone = sample_images(tiny_pipe, prompts[1:2], seeds[1:2], batch_size=1, **settings)
    chunked = sample_images(tiny_pipe, prompts, seeds, batch_size=2, **settings)
    assert batched.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(alone[0], batched[1], atol=1e-5)
    np.testing.assert_allclose(chunked, batched, atol=1e-5)
    other = sample_images(tiny_pipe, prompts[1:2], [10], batch_size=1, **settings)
    assert np.abs(other[0] - alone[0]).max() > 1e-2  # the seed matters, so equality above means something


def test_the_three_callers_share_the_rule(tiny_pipe):
    from dmm.pipeline import generate
    from dmm.toyworld.train import generate as toy_generate

    prompts = ["a red circle", "a blue square", "a green triangle"]
    one = generate(tiny_pipe, prompts, seed=5, steps=2, batch_size=1, output_type="np")
    three = generate(tiny_pipe, prompts, seed=5, steps=2, batch_size=3, output_type="np")
    np.testing.assert_allclose(one, three, atol=1e-5)
    np.testing.assert_allclose(one[2], sample_images(tiny_pipe, prompts[2:], [7], steps=2, guidance_scale=3.0,
                                                     output_type="np")[0], atol=1e-5)
    a = toy_generate(tiny_pipe, prompts, seed=3, steps=2, batch_size=1)
    b = toy_generate(tiny_pipe, prompts, seed=3, steps=2, batch_size=2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    c = toy_generate(tiny_pipe, prompts, seed=4, steps=2, batch_size=2)
    assert (a - c).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # a near seed shares no image's noise


@pytest.mark.parametrize("steps,guidance,batch,match", [
    (0, 3.0, 1, "steps must be"), (2, -1.0, 1, "guidance scale must be"), (2, 3.0, 0, "batch size must be")])
def test_sample_images_refuses_nonsense(tiny_pipe, steps, guidance, batch, match):
    with pytest.raises(SamplingError, match=match):
        sample_images(tiny_pipe, ["a"], [0], steps=steps, guidance_scale=guidance, batch_size=batch)
    with pytest.raises(SamplingError, match="one seed per image"):
        sample_images(tiny_pipe, ["a", "b"], [0], steps=2, guidance_scale=1.0)


@pytest.mark.parametrize("flag,value,message", [
    ("--steps", "0", "--steps must be a whole number of at least 1"),
    ("--guidance-scale", "-1", "--guidance-scale must be a finite number >= 0"),
    ("--num-samples", "0", "--num-samples must be at least 2"),
    ("--batch-size", "0", "--batch-size must be a whole number of at least 1"),
    ("--height", "12", "--height must be a positive multiple of 8"),
])
def test_suite_refuses_bad_sampling_settings_before_sampling(tiny_models, tmp_path, capsys, flag, value, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    teachers = [a for s, p in tiny_models["teachers"].items() for a in ("--teacher", f"{s}={p}")]
    args = ["--merged", tiny_models["merged"], *teachers, "--out", str(tmp_path / "eval"), "--prompts", str(prompts),
            "--num-samples", "2", "--steps", "2", "--no-progress", flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "eval").exists()  # nothing was sampled, not even the report folder made


def test_load_merged_from_a_folder_that_holds_a_dmm_folder(tiny_models, tmp_path):
    """A `dmm/` folder in the working directory shadows the package in sys.modules (a namespace
    package without the UNet class); load_merged must not depend on resolving it."""
    (tmp_path / "dmm").mkdir()
    code = ("import sys, dmm; from dmm.pipeline import load_merged; "
            "assert not hasattr(dmm, 'StyleUNet2DConditionModel'), 'the shadowing did not happen'; "
            f"pipe = load_merged({tiny_models['merged']!r}); "
            "print(type(pipe).__name__, type(pipe.unet).__name__, pipe.unet.style_names)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"StableDiffusionPipeline StyleUNet2DConditionModel {tiny_models['styles']}" in done.stdout
