import pytest
import torch
from diffusers import DDPMScheduler

from dmm.diffusion import add_noise, convert_prediction, predict_x0
from dmm.losses import discriminator_loss, feature_imitation_loss, generator_loss, score_distillation_loss
from dmm.models.discriminator import MultiClassDiscriminator
from dmm.models.features import BlockFeatures
from tests.conftest import unet_inputs


def test_score_distillation_is_plain_mse():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    assert score_distillation_loss(s, t).item() == pytest.approx((0 + 4 + 0 + 4) / 4)


def test_teacher_predictions_convert_to_the_students_type():
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    ac = sched.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 200, 500, 900])
    x_t = add_noise(x0, eps, t, ac)
    v = sched.get_velocity(x0, eps, t)
    # A v-teacher and an eps-student that agree on the truth have zero loss once converted.
    loss = score_distillation_loss(eps, convert_prediction(v, x_t, t, ac, "v_prediction", "epsilon"))
    assert loss.item() < 1e-8
    torch.testing.assert_close(predict_x0(v, x_t, t, ac, "v_prediction"), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(predict_x0(eps, x_t, t, ac, "epsilon"), x0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(convert_prediction(eps, x_t, t, ac, "epsilon", "v_prediction"), v,
                               rtol=1e-4, atol=1e-4)


def test_feature_imitation_averages_over_blocks():
    s = {"a": torch.zeros(2, 3), "b": torch.ones(2, 3)}
    t = {"a": torch.ones(2, 3) * 2, "b": torch.ones(2, 3)}
    assert feature_imitation_loss(s, t).item() == pytest.approx((4 + 0) / 2)
    with pytest.raises(ValueError, match="different blocks"):
        feature_imitation_loss(s, {"a": t["a"]})


def test_hooks_see_every_block(tiny_unet):
    x, t, ehs, kw = unet_inputs(tiny_unet)
    n_down, n_up = len(tiny_unet.down_blocks), len(tiny_unet.up_blocks)
    with BlockFeatures(tiny_unet) as feats:
        tiny_unet(x, t, ehs, **kw)
    expected = [f"down_blocks.{i}" for i in range(n_down)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(n_up)]
    assert list(feats.outputs) == expected
    assert feats.outputs["mid_block"].shape[1] == tiny_unet.config.block_out_channels[-1]
    assert feats.outputs[f"up_blocks.{n_up - 1}"].shape[-1] == tiny_unet.config.sample_size
    # Hooks are removed on exit.
    assert all(not b._forward_hooks for b in feats.blocks.values())


def test_discriminator_gives_2n_logits_and_trains(tiny_unet):
    disc = MultiClassDiscriminator(tiny_unet, num_styles=3)
    x, t, ehs, kw = unet_inputs(tiny_unet, batch=4)
    logits = disc(x, t, ehs, kw.get("added_cond_kwargs"))
    assert logits.shape == (4, 6)
    assert len(disc.encoder.up_blocks) == 0
    style = torch.tensor([0, 1, 2, 0])
    loss = discriminator_loss(logits, logits.detach() + 1, style, 3)
    loss.backward()
    assert disc.encoder.down_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0


def test_adversarial_losses_on_hand_checked_logits():
    n = 2
    logits = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    style = torch.tensor([0])
    assert generator_loss(logits, style, n).item() == pytest.approx(-torch.log(torch.tensor(0.7)).item(), rel=1e-5)
    fake, real = logits, torch.log(torch.tensor([[0.1, 0.1, 0.4, 0.4]]))
    expected = -torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(0.1))  # fake -> class N+0, real -> class 0
    assert discriminator_loss(fake, real, style, n).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="2N = 6"):
        generator_loss(logits, style, 3)
