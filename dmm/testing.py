"""Tiny real-architecture pipelines, shards and whole test worlds, for tests and CPU benchmarks.

Real diffusers/transformers classes with tiny configs (random weights): a CLIP tokenizer built
from a small word list, tiny CLIP text encoders, a tiny VAE and a tiny UNet, saved as a pipeline
folder that `DiffusionPipeline.from_pretrained` loads like any Stable Diffusion checkpoint.
`build_tiny_world` puts a base, perturbed "fine-tuned" teachers and shards in one folder and
`tiny_recipe_dict` writes a recipe for it: the one test world every trainer test starts from.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dmm.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from dmm.models.arch import get_arch, unet_config

WORDS = ["a", "red", "green", "blue", "circle", "square", "triangle", "small", "large", "on", "the", "left", "right"]
TEXT_DIM = 32


def tiny_unet_config(arch: str = "sdxl") -> dict:
    """The unit tests' UNet (a few hundred thousand parameters), from the one factory
    `dmm.models.arch.unet_config`. Conv projections even for SDXL: the tests' seeded weights
    (and their recorded numbers) were made that way."""
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
    atomic_write_text(folder / "vocab.json", json.dumps(vocab))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=16, pad_token="<|endoftext|>",
                                          local_files_only=True)
    tok.save_pretrained(str(folder))
    return folder


def make_tiny_pipeline(folder: str | Path, arch: str = "sdxl", seed: int = 0, prediction_type: str = "epsilon"):
    """Save a tiny random SD1.5- or SDXL-shaped pipeline folder and return the pipeline."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    tok_dir = write_tokenizer(folder / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                              projection_dim=TEXT_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type, steps_offset=1)
    unet = UNet2DConditionModel(**tiny_unet_config(arch))
    if get_arch(arch).uses_text_time:  # two text encoders, pooled text and size ids
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
    unet = UNet2DConditionModel.from_pretrained(str(base / "unet"), local_files_only=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    unet.save_pretrained(str(folder / "unet"))
    return folder


def make_layout_pipeline(folder: str | Path, arch: str = "sd15", full_size: bool = False,
                         dtype: torch.dtype = torch.float32, prediction_type: str = "epsilon", seed: int = 0,
                         weights: bool = True):
    """A random SD1.5 or SDXL pipeline with the real architecture's block structure (every key of
    the original single-file layout exists): at full size (real shapes: 4 GB for SD1.5 in fp32,
    7 GB for SDXL in fp16, so run those under the memory lock), or narrow (a few MB), where only
    the widths differ. Built directly in `dtype` and saved to `folder`, or only its configs (enough
    for `from_single_file(config=folder)`) where `weights` is False."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dmm.models.arch import standard_components

    sdxl = get_arch(arch).uses_text_time
    standard = standard_components(arch)  # CLIP ViT-L/14, OpenCLIP ViT-bigG/14 (SDXL), the SD VAE
    unet_cfg, vae_cfg = dict(standard["unet"][1]), dict(standard["vae"][1])
    te_cfgs = [dict(standard[name][1]) for name in ("text_encoder", "text_encoder_2") if name in standard]
    if not full_size:  # the same block structure (layers, heads' layout, every key), a few channels wide
        for cfg, width in zip(te_cfgs, (16, 24)):
            cfg.update(hidden_size=width, intermediate_size=32, num_attention_heads=2, projection_dim=width,
                       vocab_size=None)
        vae_cfg.update(block_out_channels=(8, 16, 32, 32), norm_num_groups=4)
        unet_cfg.update(block_out_channels=tuple(c // 40 for c in unet_cfg["block_out_channels"]), norm_num_groups=8,
                        attention_head_dim=(2,) * 3 if sdxl else 4, sample_size=16,
                        cross_attention_dim=sum(cfg["hidden_size"] for cfg in te_cfgs))
        if sdxl:
            unet_cfg.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 24)
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(Path(folder) / "_tokenizer_src")),
                                                  local_files_only=True)
        encoders = []
        for i, cfg in enumerate(te_cfgs):
            config = CLIPTextConfig(**{**cfg, "vocab_size": cfg["vocab_size"] or len(tokenizer)}, bos_token_id=0,
                                    eos_token_id=1, pad_token_id=1)
            encoders.append((CLIPTextModelWithProjection if i == 1 else CLIPTextModel)(config))
        vae = AutoencoderKL(**vae_cfg, sample_size=get_arch(arch).default_resolution)
        unet = UNet2DConditionModel(**unet_cfg)
    finally:
        torch.set_default_dtype(previous)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    if sdxl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if weights:
        pipe.save_pretrained(str(folder))
    else:
        save_configs(pipe, folder)
    return pipe


def save_configs(pipe, folder: str | Path) -> Path:
    """A pipeline folder without weights: model_index.json, each component's config, the tokenizers."""
    folder = Path(folder)
    pipe.save_config(str(folder))
    for name, component in pipe.components.items():
        if component is None:
            continue
        if hasattr(component, "save_config"):  # diffusers models and schedulers
            component.save_config(str(folder / name))
        elif hasattr(component, "config"):  # transformers models
            component.config.save_pretrained(str(folder / name))
        else:
            component.save_pretrained(str(folder / name))
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
        shard = io.BytesIO()
        with tarfile.open(fileobj=shard, mode="w") as tar:
            for k in range(s, min(n, s + per_shard)):
                img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                caption = " ".join(rng.choice(WORDS[1:], size=3))
                for ext, data in (("png", buf.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{k:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        atomic_write_bytes(path, shard.getvalue())
        paths.append(path)
    return paths


WORLD_JSON = "world.json"


@dataclass(frozen=True)
class TinyWorld:
    """A built test world: base pipeline folder, teacher folders by name (recipe order), shards."""

    root: Path
    base: Path
    teachers: dict[str, Path]
    shards: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _WorldSpec:
    """What a world folder was built with (its world.json): a rebuild with other settings is refused."""

    arch: str
    teachers: list[str]
    n_samples: int
    per_shard: int
    prediction_type: str


def _teacher_names(teachers: int | Sequence[str]) -> list[str]:
    names = [f"style{i}" for i in range(teachers)] if isinstance(teachers, int) else [str(t) for t in teachers]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"teachers: give a positive count or distinct names, got {teachers!r}")
    return names


def _world_from(root: Path, spec: _WorldSpec, shards: list[str]) -> TinyWorld:
    return TinyWorld(root=root, base=root / "base", teachers={n: root / f"teacher_{n}" for n in spec.teachers},
                     shards=[root / "shards" / s for s in shards])


def build_tiny_world(folder: str | Path, arch: str = "sdxl", teachers: int | Sequence[str] = 2,
                     n_samples: int = 64, per_shard: int = 16, prediction_type: str = "epsilon") -> TinyWorld:
    """A tiny base pipeline, one perturbed copy per teacher (`teacher_<name>`, seeds 1, 2, ...) and
    `n_samples` shard samples under `folder`. Idempotent: a folder finished with the same settings
    (its world.json) is reused; one built with other settings is refused rather than mixed."""
    root = Path(folder)
    spec = _WorldSpec(arch, _teacher_names(teachers), int(n_samples), int(per_shard), prediction_type)
    marker = root / WORLD_JSON
    if marker.is_file():
        done = json.loads(marker.read_text())
        built = {k: done.get(k) for k in asdict(spec)}
        if built != asdict(spec):
            diff = {k: (built[k], v) for k, v in asdict(spec).items() if built[k] != v}
            raise ValueError(f"{root} holds a tiny world built with other settings (built, asked): {diff}; "
                             "use another folder or delete this one")
        return _world_from(root, spec, done["shards"])
    make_tiny_pipeline(root / "base", arch, prediction_type=prediction_type)
    for i, name in enumerate(spec.teachers):
        make_teacher(root / "base", root / f"teacher_{name}", seed=i + 1)
    shards = [p.name for p in write_shards(root / "shards", n_samples, per_shard=per_shard)]
    atomic_write_json(marker, {**asdict(spec), "shards": shards})
    return _world_from(root, spec, shards)


def tiny_recipe_dict(world: TinyWorld, out: str | Path, *, teachers: int | None = None, **sections) -> dict:
    """A raw recipe (dict) training on `world` into `out`: 3 steps of batch 4 at 16x16, a checkpoint
    every 2. `teachers` keeps the first k teachers; each keyword updates that section (a mapping)
    or sets that key (anything else), e.g. `train={"max_steps": 4}` or `name="other"`."""
    names = list(world.teachers)[:teachers] if teachers is not None else list(world.teachers)
    if teachers is not None and not 0 < teachers <= len(world.teachers):
        raise ValueError(f"teachers={teachers}: the world at {world.root} has {len(world.teachers)} teachers")
    raw = {
        "name": "tiny",
        "model": {"base": str(world.base)},
        "teachers": [{"name": n, "path": str(world.teachers[n])} for n in names],
        "data": {"shards": [str(s) for s in world.shards], "resolution": 16, "batch_size": 4},
        "train": {"max_steps": 3, "output_dir": str(out), "checkpoint_every": 2, "log_every": 1},
        "optim": {"lr": 1e-3, "disc_lr": 1e-3},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return raw
