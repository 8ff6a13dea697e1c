"""Style and content classifier: the toy world's judge and its FID feature space.

A small CNN with one head per attribute (style + each content attribute). Its penultimate layer is
the feature space for toy FID. It is trained on rendered images with augmentations that mimic
generated images (blur, noise, contrast jitter, a VAE round trip) and, optionally, fine-tuned on a
few teacher samples, so that it can be trusted on model outputs.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmm.io import atomic_save_safetensors, atomic_write_text

from .content import ATTRIBUTES, attribute_values

WEIGHTS, CONFIG = "classifier.safetensors", "classifier.json"


@dataclass
class ClassifierConfig:
    styles: list[str]
    heads: dict[str, list[str]] = field(default_factory=dict)  # attribute -> class names (style first)
    channels: tuple[int, ...] = (32, 64, 64)
    feature_dim: int = 256
    resolution: int = 32

    def __post_init__(self) -> None:
        if not self.heads:
            self.heads = {"style": list(self.styles), **{a: list(attribute_values(a)) for a in ATTRIBUTES}}
        self.channels = tuple(self.channels)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class ToyClassifier(nn.Module):
    """CNN: 32x32 -> 4x4 feature map -> flatten (keeps position) -> `feature_dim` features -> heads."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers, cin = [], 3
        for c in config.channels:
            layers += [_block(cin, c, 1), _block(c, c, 2)]
            cin = c
        self.body = nn.Sequential(*layers)
        side = config.resolution // 2 ** len(config.channels)
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, config.feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(config.feature_dim, len(v)) for k, v in config.heads.items()})

    @staticmethod
    def as_tensor(images) -> torch.Tensor:
        """FloatTensor [B,3,H,W] in [0,1], uint8 array [B,H,W,3] or a list of PIL images -> [B,3,H,W] float."""
        if isinstance(images, torch.Tensor):
            x = images.float()
            if images.dtype == torch.uint8:
                x = x / 255.0
        elif isinstance(images, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
            x = x.permute(0, 3, 1, 2)
        else:
            x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)
                             for im in images])
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got {tuple(x.shape)}")
        return x

    def _prepare(self, images) -> torch.Tensor:
        x = self.as_tensor(images).to(next(self.parameters()).device)
        if x.shape[-1] != self.config.resolution or x.shape[-2] != self.config.resolution:
            x = F.interpolate(x, size=(self.config.resolution,) * 2, mode="area")
        return x * 2.0 - 1.0

    def forward(self, images) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = self.neck(self.body(self._prepare(images)))
        return feats, {k: head(feats) for k, head in self.heads.items()}

    @torch.no_grad()
    def features(self, images, batch_size: int = 512) -> torch.Tensor:
        """Penultimate features [B, feature_dim]: the toy FID feature space."""
        x = self.as_tensor(images)
        return torch.cat([self(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)]).cpu()

    @torch.no_grad()
    def predict(self, images, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Predicted class index per head ('style' and each content attribute)."""
        x = self.as_tensor(images)
        outs = [self(x[i:i + batch_size])[1] for i in range(0, len(x), batch_size)]
        return {k: torch.cat([o[k] for o in outs]).argmax(-1).cpu() for k in self.heads}

    @torch.no_grad()
    def predict_names(self, images) -> dict[str, list[str]]:
        return {k: [self.config.heads[k][i] for i in v.tolist()] for k, v in self.predict(images).items()}

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_save_safetensors(state, folder / WEIGHTS)
        atomic_write_text(folder / CONFIG, json.dumps(asdict(self.config), indent=1))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ToyClassifier":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = ClassifierConfig(**json.loads((folder / CONFIG).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
        return model.eval().requires_grad_(False)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur; sigma [B] in pixels (0 = unchanged)."""
    k = torch.arange(-3, 4, dtype=x.dtype)
    w = torch.exp(-(k[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    w = w / w.sum(-1, keepdim=True)  # [B,7]
    b, c, h, wd = x.shape
    xx = F.pad(x.reshape(1, b * c, h, wd), (3, 3, 3, 3), mode="replicate")
    kern = w.repeat_interleave(c, 0)
    xx = F.conv2d(xx, kern[:, None, None, :], groups=b * c)
    xx = F.conv2d(xx, kern[:, None, :, None], groups=b * c)
    return xx.reshape(b, c, h, wd)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, contrast/brightness jitter and noise: the degradations of decoded diffusion samples."""
    b = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=generator)  # noqa: E731
    sigma = u(b) * 1.3 * (u(b) < 0.6)
    x = _gaussian_blur(x, sigma)
    contrast = 1 + (u(b, 1, 1, 1) - 0.5) * 0.3
    bright = (u(b, 1, 1, 1) - 0.5) * 0.12
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + bright
    x = x + torch.randn(x.shape, generator=generator) * u(b, 1, 1, 1) * 0.06
    return x.clamp(0, 1)


def train_classifier(model: ToyClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor], steps: int,
                     seed: int, batch_size: int = 128, lr: float = 2e-3, aug: bool = True,
                     progress: bool = True) -> ToyClassifier:
    """Cross-entropy on every head; images float [N,3,32,32] in [0,1], labels per head [N] (-1: unknown)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train().requires_grad_(True)
    for _ in tqdm(range(steps), desc="classifier", disable=not progress, mininterval=2):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = images[idx]
        if aug:
            x = augment(x, g)
        _, logits = model(x)
        loss = 0.0
        for k in logits:  # label -1 = unknown for that head (e.g. content of a generated sample)
            if k in labels:
                y = labels[k][idx]
                loss = loss + F.cross_entropy(logits[k], y, ignore_index=-1, reduction="sum") / (y >= 0).sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)
