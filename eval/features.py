"""Feature extractors for FID, behind the generic registry ``FEATURE_EXTRACTORS`` (`dmm.registry`).

Every extractor takes images as a float tensor ``[B, 3, H, W]`` in ``[0, 1]`` and returns
``[B, D]`` features; ``describe()`` says what it is (written into every report, since the
network, its weights and the resize filter all change the number).

Built-in entries: ``inception`` (the FID Inception-v3, `eval.inception`) and ``toyworld`` (the
toy world classifier's features). Add your own in any module, loaded with ``--plugin``::

    @FEATURE_EXTRACTORS.register("mine", description="one line", options=MyOptions)
    def build(cfg: FeatureConfig) -> FeatureExtractor:  # cfg.options is a MyOptions
        return ModuleFeatures(my_module, name="mine")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmm.registry import Registry

__all__ = [
    "FEATURE_EXTRACTORS",
    "RESIZE_MODES",
    "FeatureConfig",
    "FeatureExtractor",
    "ModuleFeatures",
    "ToyWorldFeatures",
    "build_feature_extractor",
    "resize_images",
]

RESIZE_MODES = ("bilinear", "bilinear-antialias", "bicubic-pil", "none")


@dataclass
class FeatureConfig:
    """What to build: ``name`` from the registry plus the options extractors may read."""

    name: str = "inception"
    weights: str | None = None  # inception: local weights file
    resize: str = "bilinear"  # one of RESIZE_MODES (inception input is 299 x 299)
    toyworld: str = "assets/toyworld"  # toyworld: the world folder
    device: str = "cpu"
    batch_size: int = 32
    options: object = field(default_factory=dict)  # the entry's typed options (a mapping is parsed)


def resize_images(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize ``[B, 3, H, W]`` float images to ``size x size`` with a named, recorded filter."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if mode == "none" or tuple(images.shape[-2:]) == (size, size):
        return images
    if mode == "bilinear":  # pytorch-fid
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    if mode == "bilinear-antialias":  # torchmetrics >= 1.8
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    # bicubic-pil: PIL bicubic on float32 channels (clean-fid's "clean" resize)
    from PIL import Image

    out = np.empty((images.shape[0], images.shape[1], size, size), dtype=np.float32)
    arr = images.detach().cpu().float().numpy()
    for b in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            img = Image.fromarray(arr[b, c], mode="F").resize((size, size), resample=Image.BICUBIC)
            out[b, c] = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(out).to(images.device, images.dtype)


class FeatureExtractor:
    """Base class: ``__call__(images [B,3,H,W] in [0,1]) -> [B, D]``, ``dim`` and ``describe()``."""

    name: str = "features"
    dim: int = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim}

    def extract(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Features of ``images`` in batches, as a float64 CPU tensor."""
        outs = []
        for start in range(0, images.shape[0], batch_size):
            with torch.no_grad():
                outs.append(self(images[start : start + batch_size]).detach().to("cpu", torch.float64))
        return torch.cat(outs) if outs else torch.zeros(0, self.dim, dtype=torch.float64)


class ModuleFeatures(FeatureExtractor):
    """Any ``nn.Module`` mapping ``[B,3,H,W]`` in ``[0,1]`` to ``[B, D]`` (``D`` probed if not given)."""

    def __init__(self, module: nn.Module, name: str = "module", dim: int | None = None,
                 input_size: int | None = None, resize: str = "bilinear", device: str = "cpu", info=None):
        self.module = module.eval().to(device)
        self.name = name
        self.input_size = input_size
        self.resize = resize
        self.device = device
        self.info = dict(info or {})
        if dim is None:
            probe = torch.rand(2, 3, input_size or 32, input_size or 32)
            dim = int(self(probe).shape[-1])
        self.dim = dim

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if self.input_size is not None:
            x = resize_images(x, self.input_size, self.resize)
        with torch.no_grad():
            out = self.module(x)
        if out.dim() != 2:
            out = out.reshape(out.shape[0], -1)
        return out

    def describe(self) -> dict:
        d = {"name": self.name, "dim": self.dim, "module": type(self.module).__name__}
        if self.input_size is not None:
            d.update(input_size=self.input_size, resize=self.resize)
        d.update(self.info)
        return d


class ToyWorldFeatures(FeatureExtractor):
    """The toy world classifier's features (the toy's FID network)."""

    name = "toyworld"

    def __init__(self, world, path: str = "", device: str = "cpu"):
        self.world = world
        self.classifier = world.classifier
        if isinstance(self.classifier, nn.Module):
            self.classifier.eval().to(device)
        self.device = device
        self.path = str(path)
        with torch.no_grad():
            probe = self.classifier.features(torch.rand(2, 3, 32, 32, device=device))
        self.dim = int(probe.shape[-1])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.features(images.to(self.device, torch.float32))

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "world": self.path,
                "network": type(self.classifier).__name__, "resize": "none (native 32x32)"}


# --------------------------------------------------------------------------- registry
FEATURE_EXTRACTORS: Registry = Registry("feature extractor", builtins="eval.inception")


@FEATURE_EXTRACTORS.register("toyworld", description="the toy world classifier's penultimate features "
                             "(the toy's FID network; --toyworld)")
def _build_toyworld(cfg: FeatureConfig) -> FeatureExtractor:
    try:
        from dmm.toyworld import load_world
    except ImportError as exc:
        raise RuntimeError(f"the 'toyworld' feature extractor needs dmm.toyworld ({exc})") from exc
    return ToyWorldFeatures(load_world(cfg.toyworld), cfg.toyworld, cfg.device)


def build_feature_extractor(cfg: FeatureConfig | str) -> FeatureExtractor:
    """The registered extractor ``cfg.name``, its factory given ``cfg`` with typed ``options``."""
    cfg = FeatureConfig(name=cfg) if isinstance(cfg, str) else cfg
    entry = FEATURE_EXTRACTORS.get(cfg.name)
    options = cfg.options if dataclasses.is_dataclass(cfg.options) else \
        entry.parse_options(cfg.options, f"feature extractor {cfg.name!r} options")
    return entry.obj(dataclasses.replace(cfg, options=options))
