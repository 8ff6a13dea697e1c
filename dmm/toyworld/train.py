"""Training loops of the toy world: tiny CLIP, VAE, UNets (base and per-style teachers), and sampling.

Recipes follow what was measured to work on 2 CPU cores: hard-negative contrastive batches for
CLIP (random batches leave position and shape unlearnt), v-prediction on the `squaredcos_cap_v2`
schedule with min-SNR-5 weighting, 10% empty-caption dropout, AdamW with warmup + cosine, EMA.
"""
from __future__ import annotations

import copy
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dmm.train.schedule import lr_factor

from .conditioning import CaptionTable
from .content import ATTRIBUTES, Content, all_captions, attribute_values
from .render import render


def warmup_cosine(warmup: int, total: int, floor: float = 0.05):
    """LambdaLR factor: linear warmup then cosine decay to `floor` x the peak (the trainer's curve)."""
    return functools.partial(lr_factor, schedule="cosine", warmup=warmup, total=total, floor=floor)


def to_unit(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0


# ----------------------------------------------------------------------------------------------- CLIP
def hard_negative_group(anchor: Content, rng: np.random.Generator) -> list[Content]:
    """The anchor plus one variant per attribute that differs from it in exactly that attribute."""
    group = [anchor]
    for attr in ATTRIBUTES:
        others = [v for v in attribute_values(attr) if v != getattr(anchor, attr)]
        d = anchor.to_dict()
        d[attr] = str(rng.choice(others))
        group.append(Content(**d))
    return group


def _multi_positive_nce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """InfoNCE where every item with the same caption counts as a positive."""
    pos = logits.masked_fill(~positive, float("-inf")).logsumexp(-1)
    return (logits.logsumexp(-1) - pos).mean()


def clip_batch(rng: np.random.Generator, styles: list[str], groups: int):
    contents = [c for _ in range(groups) for c in hard_negative_group(Content.sample(rng), rng)]
    images = np.stack([np.asarray(render(c, styles[int(rng.integers(len(styles)))], rng)) for c in contents])
    return contents, to_unit(images)


def train_clip(clip, tokenizer, styles: list[str], steps: int, seed: int, groups: int = 12, lr: float = 2e-3,
               progress: bool = True):
    """Contrastive training on hard-negative groups (anchor + 4 one-attribute variants), mixed styles."""
    captions = all_captions()
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt")["input_ids"]
    row = {c: i for i, c in enumerate(captions)}
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, steps // 20), steps))
    clip.train().requires_grad_(True)
    for step in tqdm(range(steps), desc="clip", disable=not progress, mininterval=2):
        rng = np.random.default_rng([seed, step])
        contents, images = clip_batch(rng, styles, groups)
        rows = torch.tensor([row[c.caption] for c in contents])
        out = clip(input_ids=ids[rows], pixel_values=images * 2 - 1)
        positive = rows[:, None] == rows[None, :]
        loss = 0.5 * (_multi_positive_nce(out.logits_per_text, positive)
                      + _multi_positive_nce(out.logits_per_image, positive))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
    return clip.eval().requires_grad_(False)


@torch.no_grad()
def clip_top1(clip, tokenizer, styles: list[str], seed: int, n: int = 64, trials: int = 4) -> float:
    """Caption -> image top-1 among `n` random items (distinct captions), averaged over trials."""
    hits = total = 0
    for t in range(trials):
        rng = np.random.default_rng([seed, 10_000 + t])
        contents, seen = [], set()
        while len(contents) < n:
            c = Content.sample(rng)
            if c.caption not in seen:
                seen.add(c.caption)
                contents.append(c)
        images = to_unit(np.stack([np.asarray(render(c, styles[int(rng.integers(len(styles)))], rng))
                                   for c in contents]))
        ids = tokenizer([c.caption for c in contents], padding="max_length",
                        max_length=tokenizer.model_max_length, return_tensors="pt")["input_ids"]
        logits = clip(input_ids=ids, pixel_values=images * 2 - 1).logits_per_text
        hits += (logits.argmax(-1) == torch.arange(n)).sum().item()
        total += n
    return hits / total


@torch.no_grad()
def pooled_rms(text_encoder_2, tokenizer) -> float:
    """RMS of the projected pooled embedding over the caption set (to fold 1/RMS into the projection)."""
    ids = tokenizer(all_captions() + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt")["input_ids"]
    return text_encoder_2(ids).text_embeds.pow(2).mean().sqrt().item()


# ------------------------------------------------------------------------------------------------ VAE
def train_vae(vae, images: torch.Tensor, steps: int, seed: int, batch_size: int = 32, lr: float = 1e-3,
              kl_weight: float = 1e-6, fg_weight: float = 8.0, progress: bool = True):
    """Reconstruction (MSE + L1) of the posterior mean with a tiny KL term (keeps latents bounded);
    images float [N,3,H,W] in [0,1]. Decoding noisy samples slowed learning a lot at this scale."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, steps // 20), steps))
    vae.train().requires_grad_(True)
    for _ in tqdm(range(steps), desc="vae", disable=not progress, mininterval=2):
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample  # decode the mean: diffusion trains on latent means too
        # up-weight the shape (pixels far from the image's median colour): it covers ~10% of the image
        fg = (x - x.flatten(2).median(-1).values[..., None, None]).abs().amax(1, keepdim=True)
        w = 1.0 + fg_weight * (fg > 0.15).float()
        loss = (w * (rec - x) ** 2).mean() + 0.1 * F.l1_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 512, scaled: bool = True) -> torch.Tensor:
    """Latent means of images float [N,3,H,W] in [0,1], times the VAE's scaling factor."""
    out = torch.cat([vae.encode(images[i:i + batch_size] * 2 - 1).latent_dist.mean
                     for i in range(0, len(images), batch_size)])
    return out * vae.config.scaling_factor if scaled else out


@torch.no_grad()
def vae_roundtrip(vae, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    out = [vae.decode(vae.encode(images[i:i + batch_size] * 2 - 1).latent_dist.mean).sample
           for i in range(0, len(images), batch_size)]
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


# ----------------------------------------------------------------------------------------------- UNet
def train_unet(unet, latents: torch.Tensor, caption_rows: torch.Tensor, table: CaptionTable, steps: int,
               seed: int, lr: float = 1e-3, warmup: int = 100, batch_size: int = 32, dropout: float = 0.1,
               snr_gamma: float = 5.0, ema_decay: float = 0.999, desc: str = "unet", progress: bool = True,
               sync_grads=None, params: list | None = None):
    """v-prediction denoising with min-SNR weighting; returns the EMA weights in a UNet.

    `sync_grads(params)` (optional) averages gradients across data-parallel processes; each process
    then draws its own `batch_size` samples (pass a different `seed` per process). `params`: train
    only these (a LoRA's adapter weights); the rest of the UNet stays frozen."""
    from .models import make_train_scheduler

    sched_noise = make_train_scheduler()
    alphas = sched_noise.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight_t = snr.clamp(max=snr_gamma) / (snr + 1)  # min-SNR-gamma for v-prediction
    g = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(unet).requires_grad_(False)
    if params is None:
        params = list(unet.parameters())
    trained = {id(p) for p in params}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps))
    unet.train()
    for p in unet.parameters():
        p.requires_grad_(id(p) in trained)
    pairs = [(pe, p) for pe, p in zip(ema.parameters(), unet.parameters()) if id(p) in trained]
    n_t = sched_noise.config.num_train_timesteps
    for step in tqdm(range(steps), desc=desc, disable=not progress, mininterval=2):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        rows = caption_rows[idx].clone()
        rows[torch.rand(batch_size, generator=g) < dropout] = table.empty_index
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, n_t, (batch_size,), generator=g)
        xt = sched_noise.add_noise(x0, noise, t)
        target = sched_noise.get_velocity(x0, noise, t)
        pred = unet(xt, t, **table.unet_inputs(rows)).sample
        loss = ((pred - target) ** 2).mean(dim=(1, 2, 3)).mul(weight_t[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sync_grads is not None:
            sync_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in pairs:
                pe.lerp_(p, 1 - decay)
    return ema.eval()


def allreduce_mean_grads(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over the default process group (gloo on CPU), in one flat buffer."""
    import torch.distributed as dist

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


@torch.no_grad()
def generate(pipe, captions: list[str], seed: int, steps: int = 20, guidance: float = 3.0,
             batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Samples of a stock pipeline for `captions`: float [N,3,H,W] in [0,1], deterministic from seed.

    Image k's seed is drawn from `seed` (numpy SeedSequence), not `seed + k`, so two sets whose seeds
    are close (the builder's eval and train sets) never share noise; batch size changes nothing."""
    from dmm.sampling import sample_images

    pipe.set_progress_bar_config(disable=True)
    seeds = np.random.SeedSequence(seed).generate_state(len(captions)).tolist()
    bar = tqdm(total=len(captions), desc="sample", disable=not progress)
    images = sample_images(pipe, captions, seeds, steps=steps, guidance_scale=guidance, batch_size=batch_size,
                           output_type="pt", on_batch=lambda done, total: bar.update(done - bar.n))
    bar.close()
    return images.float().clamp(0, 1)
