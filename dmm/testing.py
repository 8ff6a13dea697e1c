"""Tiny real-architecture pipelines and shards, for tests and CPU benchmarks (random weights).

Real diffusers/transformers classes with tiny configs: a CLIP tokenizer built from a small word
list, tiny CLIP text encoders, a tiny VAE and a tiny UNet, saved as a pipeline folder that
`DiffusionPipeline.from_pretrained` loads like any Stable Diffusion checkpoint.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

WORDS = ["a", "red", "green", "blue", "circle", "square", "triangle", "small", "large", "on", "the", "left", "right"]
TEXT_DIM = 32


def tiny_unet_config(arch: str = "sdxl") -> dict:
    """The unit tests' UNet (a few hundred thousand parameters), from the one factory
    `dmm.models.arch.unet_config`. Conv projections even for SDXL: the tests' seeded weights
    (and their recorded numbers) were made that way."""
    from dmm.models.arch import unet_config

    return unet_config(arch, text_dim=TEXT_DIM, sample_size=8, use_linear_projection=False)


def write_tokenizer(folder: Path, words=WORDS) -> Path:
    """A real CLIPTokenizer folder (vocab.json + merges.txt) where every word is one token."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in words:
        vocab[f"{w}</w>"] = len(vocab)
    chars = sorted({c for w in words for c in w})
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(f"{c}</w>", len(vocab))
    # Merges that rebuild each word from characters, in order, so whole words become single tokens.
    merges, have = [], set(vocab)
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merged = a + b
            if (a, b) not in {tuple(m.split()) for m in merges}:
                merges.append(f"{a} {b}")
            if merged not in have:
                vocab[merged] = len(vocab)
                have.add(merged)
            parts = [merged] + parts[2:]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=16, pad_token="<|endoftext|>")
    tok.save_pretrained(str(folder))
    return folder


def make_tiny_pipeline(folder: str | Path, arch: str = "sdxl", seed: int = 0, prediction_type: str = "epsilon"):
    """Save a tiny random SD1.5- or SDXL-shaped pipeline folder and return the pipeline."""
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    tok_dir = write_tokenizer(folder / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                              projection_dim=TEXT_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type, steps_offset=1)
    unet = UNet2DConditionModel(**tiny_unet_config(arch))
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_cfg), text_encoder_2=
                                         CLIPTextModelWithProjection(text_cfg), tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text_cfg), tokenizer=tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return pipe


def make_teacher(base: str | Path, folder: str | Path, seed: int, scale: float = 0.02) -> Path:
    """A "fine-tune" of the base: the base pipeline folder with its UNet weights perturbed."""
    import shutil

    from diffusers import UNet2DConditionModel

    base, folder = Path(base), Path(folder)
    shutil.copytree(base, folder, dirs_exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(str(base / "unet"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    unet.save_pretrained(str(folder / "unet"))
    return folder


def write_shards(folder: str | Path, n: int, per_shard: int = 16, size: int = 16, seed: int = 0) -> list[Path]:
    """Real webdataset tar shards of random-colour images with captions from WORDS."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"shard-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(s, min(n, s + per_shard)):
                img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                caption = " ".join(rng.choice(WORDS[1:], size=3))
                for ext, data in (("png", buf.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{k:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
