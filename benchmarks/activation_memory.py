#!/usr/bin/env python
"""Per-sample activation memory of the full-size SD1.5 / SDXL UNets, measured on this CPU: the
figures `dmm.train.dryrun` scales to a recipe's resolution.

  flock /tmp/dmm-bigmem.lock .venv/bin/python benchmarks/activation_memory.py --arch sd15 --latent 16 32
  flock /tmp/dmm-bigmem.lock .venv/bin/python benchmarks/activation_memory.py --arch sdxl --latent 16 \
      --parts student --precision bf16 --checkpointing on      (one configuration)

For every part of a training micro-step that holds per-sample memory:
  student         StyleUNet fwd+bwd with the feature hooks and the score + feature losses
                  (fp32 or bf16 autocast; gradient checkpointing off or on)
  disc            the multi-class discriminator fwd+bwd with trainable parameters (its update)
  disc_frozen     the discriminator frozen, gradient to its input only (the generator loss)
  teacher         a no-grad teacher forward with the feature hooks (fp32 or bf16 weights)
  vae             the frozen VAE's no-grad encode (fp32), at the latent's pixel size
the increase of the process's peak resident set over its resident set just before the step
(/proc/self/clear_refs resets the peak; malloc_trim returns freed heap first) is measured at
batch 1 and batch 2, after a warm-up step; the difference is the memory of one more sample.
Parameter gradients are dropped as they arrive (a post-accumulate hook), so the figure holds
activations and their gradients, not the (batch-independent) parameter gradients. Weights are
random (nothing is read). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dmm.train.dryrun import peak_rise  # noqa: E402  (the same measurement as the dry run's own)

TOKENS = 77
STYLES = 4


def random_init(module):
    import torch

    module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.02, 0.02)
        for b in module.buffers():
            b.zero_()
    return module


def inputs(arch: str, config: dict, batch: int, latent: int):
    import torch

    g = torch.Generator().manual_seed(batch * 1000 + latent)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ehs = torch.randn(batch, TOKENS, config["cross_attention_dim"], generator=g)
    kwargs = {}
    if arch == "sdxl":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                       "time_ids": torch.rand(batch, 6, generator=g) * 1024}
    return x, t, ehs, kwargs


def drop_grads(module) -> None:
    for p in module.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


def autocast(precision: str):
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def measure_student(arch, config, latent, precision, checkpointing, forward_only=False):
    import torch

    from dmm.losses import feature_imitation_loss, score_distillation_loss
    from dmm.models.arch import block_output_shapes
    from dmm.models.features import BlockFeatures
    from dmm.models.student import StyleUNet2DConditionModel

    with torch.device("meta"):
        student = StyleUNet2DConditionModel(**config, style_names=[f"s{i}" for i in range(STYLES)])
    random_init(student).train()
    drop_grads(student)
    if checkpointing:
        student.enable_gradient_checkpointing()
    shapes = block_output_shapes(config, latent)
    out = {}
    for label, batch in (("warm", 1), (1, 1), (2, 2)):
        x, t, ehs, kwargs = inputs(arch, config, batch, latent)
        styles = torch.arange(batch) % STYLES
        # The teacher's outputs (targets) exist before the student's step: made outside the measurement.
        target = torch.zeros(batch, 4, latent, latent)
        feats = {k: torch.zeros(batch, *shape) for k, shape in shapes.items()}

        def step():
            with autocast(precision), BlockFeatures(student) as rec:
                pred = student(x, t, ehs, class_labels=styles, **kwargs).sample
            loss = score_distillation_loss(pred, target) + 1e-3 * feature_imitation_loss(rec.outputs, feats)
            if not forward_only:  # else the graph (every saved activation) is alive when the step returns
                loss.backward()

        out[label] = peak_rise(step)
    return out


def measure_disc(arch, config, latent, precision, frozen, forward_only=False, checkpointing=False):
    import torch
    from diffusers import UNet2DConditionModel

    from dmm.losses import discriminator_loss, generator_loss
    from dmm.models.discriminator import MultiClassDiscriminator

    with torch.device("meta"):
        disc = MultiClassDiscriminator(UNet2DConditionModel(**config), STYLES)
    random_init(disc).train()
    if checkpointing:
        disc.enable_gradient_checkpointing()
    disc.requires_grad_(not frozen)
    drop_grads(disc)
    out = {}
    for label, batch in (("warm", 1), (1, 1), (2, 2)):
        x, t, ehs, kwargs = inputs(arch, config, batch, latent)
        styles = torch.arange(batch) % STYLES
        x.requires_grad_(frozen)  # the generator loss reaches the student through the input

        def step():
            with autocast(precision):
                logits = disc(x, t, ehs, **kwargs)
            if frozen:
                loss = generator_loss(logits, styles, STYLES)
            else:  # one call per measured sample; the trainer calls it for fake and real (2B samples)
                loss = discriminator_loss(logits, logits.detach(), styles, STYLES)
            if not forward_only:
                loss.backward()

        out[label] = peak_rise(step)
    return out


def measure_teacher(arch, config, latent, dtype_name):
    import torch
    from diffusers import UNet2DConditionModel

    from dmm.models.features import BlockFeatures

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    with torch.device("meta"):
        teacher = UNet2DConditionModel(**config)
    random_init(teacher).to(dtype).eval().requires_grad_(False)
    out = {}
    for label, batch in (("warm", 1), (1, 1), (2, 2)):
        x, t, ehs, kwargs = inputs(arch, config, batch, latent)
        kwargs = {k: {n: v.to(dtype) for n, v in a.items()} for k, a in kwargs.items()}

        def step():  # the block outputs are dropped: dryrun counts the kept fp32 features exactly
            with torch.no_grad(), BlockFeatures(teacher, detach=True):
                teacher(x.to(dtype), t, ehs.to(dtype), **kwargs)

        out[label] = peak_rise(step)
    return out


def measure_vae(arch, latent):
    import torch
    from diffusers import AutoencoderKL

    from dmm.models.arch import standard_components, vae_scale_factor

    config = standard_components(arch)["vae"][1]
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    random_init(vae).eval().requires_grad_(False)
    side = latent * vae_scale_factor(config)
    out = {}
    for label, batch in (("warm", 1), (1, 1), (2, 2)):
        pixels = torch.rand(batch, 3, side, side) * 2 - 1

        def step():
            with torch.no_grad():
                vae.encode(pixels).latent_dist.mode()

        out[label] = peak_rise(step)
    return out


PARTS = {
    "student": [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)],
    "disc": [("fp32", False), ("bf16", False)],
    "disc_frozen": [("fp32", True), ("bf16", True)],
    "teacher": [("fp32", None), ("bf16", None)],
    "vae": [("fp32", None)],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd15", "sdxl"], required=True)
    parser.add_argument("--latent", type=int, nargs="+", default=[16, 32], help="latent side lengths to measure")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="only this precision")
    parser.add_argument("--checkpointing", choices=["on", "off"], default=None,
                        help="student: only this setting; disc, disc_frozen: off unless on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width-divisor", type=int, default=1,
                        help="measure the architecture with every channel count divided by k (k^2 fewer "
                             "parameters, 1/k of the activations: every activation is as wide as its block); "
                             "the JSON's per_sample_bytes_full is k times the measured figure. The VAE is "
                             "always full size")
    parser.add_argument("--forward-only", action="store_true",
                        help="student/disc: the peak at the end of the forward pass, every saved activation alive "
                             "(without checkpointing the backward adds only the gradients of the last layers' "
                             "outputs; a third of the time of fwd+bwd)")
    args = parser.parse_args(argv)

    import torch

    from dmm.models.arch import sd15_unet_config, sdxl_unet_config

    torch.set_num_threads(args.threads)
    config = sd15_unet_config() if args.arch == "sd15" else sdxl_unet_config()
    if args.width_divisor > 1:  # same blocks, depth, heads and resolution; every channel count / k
        config = {**config, "block_out_channels": tuple(c // args.width_divisor for c in config["block_out_channels"]),
                  "norm_num_groups": 32 // args.width_divisor if args.width_divisor <= 4 else 8}
    for part in args.parts:
        for precision, flag in PARTS[part]:
            if args.precision and precision != args.precision:
                continue
            if part == "student" and args.checkpointing and flag != (args.checkpointing == "on"):
                continue
            for latent in args.latent:
                started = time.time()
                if part == "student":
                    res = measure_student(args.arch, config, latent, precision, flag, args.forward_only)
                elif part == "teacher":
                    res = measure_teacher(args.arch, config, latent, precision)
                elif part == "vae":
                    res = measure_vae(args.arch, latent)
                else:
                    res = measure_disc(args.arch, config, latent, precision, flag, args.forward_only,
                                       args.checkpointing == "on")
                print(json.dumps({"arch": args.arch, "part": part, "precision": precision,
                                  "checkpointing": bool(flag) if part == "student" else (
                                      args.checkpointing == "on" if part.startswith("disc") else None),
                                  "latent": latent,
                                  "forward_only": args.forward_only,
                                  "width_divisor": 1 if part == "vae" else args.width_divisor,
                                  "per_sample_bytes_full": (res[2] - res[1]) * (1 if part == "vae"
                                                                                else args.width_divisor),
                                  "per_sample_bytes": res[2] - res[1], "batch1_bytes": res[1],
                                  "warm_bytes": res["warm"], "seconds": round(time.time() - started, 1)}),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
