"""Activation checkpointing of the discriminator (`train.gradient_checkpointing`): the same losses
and gradients with it on and off, fewer bytes saved for backward, and the trainer switches it on."""

from __future__ import annotations

import copy

import pytest
import torch

from dmm.losses import discriminator_loss, generator_loss
from dmm.models.discriminator import MultiClassDiscriminator
from tests import tiny_world
from tests.conftest import unet_inputs

STYLES = 3


def _saved_bytes(fn) -> tuple[object, int]:
    """fn()'s result and the bytes of the tensors autograd saved for backward while it ran."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def _run(disc, inputs, frozen: bool, autocast: bool):
    """The discriminator update (trainable weights) or the generator loss's pass (gradient to the
    input only; frozen in forward, trainable again before backward, as in the objective); the loss,
    the gradients it leaves, and the bytes saved for backward."""
    x, t, ehs, kw = inputs
    x = x.clone().requires_grad_(frozen)
    disc.zero_grad(set_to_none=True)
    disc.requires_grad_(not frozen)
    style = torch.arange(x.shape[0]) % STYLES
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)

    def forward():
        with ctx:
            logits = disc(x, t, ehs, kw.get("added_cond_kwargs"))
        if frozen:
            return generator_loss(logits, style, STYLES)
        return discriminator_loss(logits, logits.detach().flip(0), style, STYLES)

    loss, saved = _saved_bytes(forward)
    if frozen:  # as the objective does: trainable again before the generator loss's backward
        disc.requires_grad_(True)
    loss.backward()
    if frozen:
        assert all(p.grad is None for p in disc.parameters())  # the frozen pass reaches the input only
    grads = {"input": x.grad} if frozen else {n: p.grad for n, p in disc.named_parameters()}
    return loss.detach(), grads, saved


@pytest.mark.parametrize("frozen", [False, True], ids=["update", "generator-pass"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_checkpointing_keeps_loss_and_gradients_and_saves_less(tiny_unet, frozen, autocast):
    torch.manual_seed(0)
    plain = MultiClassDiscriminator(tiny_unet, STYLES).train()
    ckpt = copy.deepcopy(plain)
    ckpt.enable_gradient_checkpointing()
    assert ckpt.encoder.is_gradient_checkpointing and not plain.encoder.is_gradient_checkpointing
    inputs = unet_inputs(tiny_unet, batch=4)
    loss_a, grads_a, saved_a = _run(plain, inputs, frozen, autocast)
    loss_b, grads_b, saved_b = _run(ckpt, inputs, frozen, autocast)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and all(g is not None for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    # Only block inputs are stored, the blocks' insides are recomputed in backward.
    assert saved_b < 0.6 * saved_a, (saved_b, saved_a)

    ckpt.disable_gradient_checkpointing()
    assert _run(ckpt, inputs, frozen, autocast)[2] == saved_a


def test_no_grad_forward_is_unchanged(tiny_unet):
    disc = MultiClassDiscriminator(tiny_unet, STYLES).eval()
    x, t, ehs, kw = unet_inputs(tiny_unet)
    with torch.no_grad():
        want = disc(x, t, ehs, kw.get("added_cond_kwargs"))
        disc.enable_gradient_checkpointing()
        got = disc(x, t, ehs, kw.get("added_cond_kwargs"))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("on", [False, True])
def test_trainer_switches_it_with_train_gradient_checkpointing(tmp_path, on):
    from dmm.train.trainer import DistillationTrainer

    world = tiny_world.build(tmp_path / "w")
    recipe = tiny_world.recipe(world, tmp_path / "run", train={"gradient_checkpointing": on})
    trainer = DistillationTrainer(recipe)
    disc = trainer.models["disc"]
    assert disc.gradient_checkpointing is on and disc.encoder.is_gradient_checkpointing is on
    assert trainer.models["student"].is_gradient_checkpointing is on
