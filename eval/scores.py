"""Text-image scores of Table 3: CLIP score, LAION aesthetic v2, PickScore.

All models come from local folders or files; nothing is downloaded. The CLIP embedder is a small
interface with two backends:
  * ``HFClipEmbedder``: a transformers ``CLIPModel`` folder (openai and LAION CLIP checkpoints,
    PickScore_v1), with its tokenizer / image processor from the same or another folder.
  * ``OpenClipEmbedder``: an open_clip model name plus a local weights file (optional extra
    ``openclip``; raises :class:`BackendUnavailable` with the reason when it cannot import).

Definitions (see /work/shared/notes/eval-facts.md):
  * CLIP score: per image 100 * cos(image_emb, text_emb); the reported value is the mean, clamped
    at 0 (as torchmetrics does).
  * Aesthetic v2: an MLP (no activations) on the L2-normalised CLIP ViT-L/14 image embedding.
  * PickScore: logit_scale.exp() * cos(text_emb, image_emb), averaged over (prompt, image) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AESTHETIC_WEIGHTS_NAME",
    "AestheticMLP",
    "BackendUnavailable",
    "ClipEmbedder",
    "HFClipEmbedder",
    "OpenClipEmbedder",
    "ScoreResult",
    "aesthetic_score",
    "build_embedder",
    "clip_score",
    "load_aesthetic_mlp",
    "pick_score",
]

AESTHETIC_WEIGHTS_NAME = "sac+logos+ava1-l14-linearMSE.pth"


class BackendUnavailable(RuntimeError):
    """An optional backend (open_clip) cannot be used here; the message says why."""


@dataclass
class ScoreResult:
    name: str
    mean: float
    per_image: list[float]
    backbone: str

    def to_dict(self) -> dict:
        return {"mean": self.mean, "n": len(self.per_image), "backbone": self.backbone}


def _to_pil(images: torch.Tensor):
    from PIL import Image

    arr = (images.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


class ClipEmbedder:
    """Normalised image and text embeddings of one CLIP backbone, plus its logit scale."""

    backbone: str = "clip"
    logit_scale: float = 100.0

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _require_dir(path, what: str, setting: str) -> Path:
    if not path:
        raise FileNotFoundError(f"{what}: no folder given (set {setting}). Nothing is downloaded.")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: {p} is not a local transformers model folder (no config.json; set by {setting}). "
            "Nothing is downloaded."
        )
    return p


class HFClipEmbedder(ClipEmbedder):
    """A transformers ``CLIPModel`` folder; ``processor`` folder defaults to the model folder."""

    PREPROCESS = ("processor", "minus1to1")

    def __init__(self, model_dir, processor_dir=None, device: str = "cpu", setting: str = "--clip-model",
                 max_length: int = 77, preprocess: str = "processor"):
        """``preprocess``: "processor" (the folder's CLIP image processor, or CLIP's resize/crop/mean/std
        defaults) or "minus1to1" (resize to the model's size, then 2x - 1: the toy world's CLIP)."""
        from transformers import CLIPModel, CLIPTokenizer

        if preprocess not in self.PREPROCESS:
            raise ValueError(f"unknown CLIP preprocessing {preprocess!r}; choose one of {self.PREPROCESS}")
        self.preprocess = preprocess
        model_dir = _require_dir(model_dir, "CLIP model", setting)
        proc_dir = Path(processor_dir) if processor_dir else model_dir
        if not proc_dir.is_dir():
            raise FileNotFoundError(f"CLIP processor folder not found: {proc_dir} (set by {setting}-processor)")
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval().to(device)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(proc_dir, local_files_only=True)
        except Exception as exc:
            raise FileNotFoundError(
                f"no CLIP tokenizer (vocab.json + merges.txt) in {proc_dir}: {type(exc).__name__}: {exc}"
            ) from exc
        self.image_processor = self._image_processor(proc_dir)
        self.device = device
        self.max_length = min(max_length, self.model.config.text_config.max_position_embeddings)
        self.logit_scale = float(self.model.logit_scale.detach().exp())
        name = getattr(self.model.config, "_name_or_path", "") or ""
        self.backbone = f"hf:{model_dir.resolve()}" + (f" ({name})" if name and name != str(model_dir) else "")
        if preprocess != "processor":
            self.backbone += f" [preprocess {preprocess}]"

    def _image_processor(self, folder: Path):
        try:
            from transformers import CLIPImageProcessorPil as Proc  # PIL backend, no torchvision
        except ImportError:  # older transformers
            from transformers import CLIPImageProcessor as Proc
        if (folder / "preprocessor_config.json").is_file():
            return Proc.from_pretrained(folder, local_files_only=True)
        size = self.model.config.vision_config.image_size
        return Proc(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        if self.preprocess == "minus1to1":
            size = self.model.config.vision_config.image_size
            x = images.float().clamp(0, 1)
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            return (x * 2 - 1).to(self.device)
        out = self.image_processor(images=_to_pil(images), return_tensors="pt")
        return out["pixel_values"].to(self.device)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        vis = self.model.vision_model(pixel_values=self.pixel_values(images))
        return F.normalize(self.model.visual_projection(vis.pooler_output).float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        txt = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(self.model.text_projection(txt.pooler_output).float(), dim=-1).cpu()


class OpenClipEmbedder(ClipEmbedder):
    """open_clip backbone from a local weights file (optional extra; needs torchvision)."""

    def __init__(self, model_name: str, pretrained: str, device: str = "cpu"):
        try:
            import open_clip
        except Exception as exc:  # ImportError, or torchvision failing to load its ops
            raise BackendUnavailable(
                f"open_clip backend unavailable: importing open_clip failed ({type(exc).__name__}: {exc}). "
                "Install the 'openclip' extra (it needs a working torchvision) or use an HF CLIPModel folder."
            ) from exc
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"open_clip weights file not found: {pretrained}. Nothing is downloaded.")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(pretrained))
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device
        self.logit_scale = float(self.model.logit_scale.detach().exp())
        self.backbone = f"open_clip:{model_name}:{Path(pretrained).resolve()}"

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.stack([self.preprocess(im) for im in _to_pil(images)]).to(self.device)
        return F.normalize(self.model.encode_image(x).float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float(), dim=-1).cpu()


def build_embedder(spec: str, processor: str | None = None, device: str = "cpu",
                   setting: str = "--clip-model", preprocess: str = "processor") -> ClipEmbedder:
    """``spec``: an HF ``CLIPModel`` folder, or ``open_clip:MODEL_NAME:WEIGHTS_FILE``."""
    if spec.startswith("open_clip:"):
        try:
            _, name, weights = spec.split(":", 2)
        except ValueError as exc:
            raise ValueError(f"{setting}: expected open_clip:MODEL_NAME:WEIGHTS_FILE, got {spec!r}") from exc
        return OpenClipEmbedder(name, weights, device=device)
    return HFClipEmbedder(spec, processor, device=device, setting=setting, preprocess=preprocess)


def _embed_in_batches(fn, items, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(items[i : i + batch_size]) for i in range(0, len(items), batch_size)])


def _check_pairs(images: torch.Tensor, prompts: Sequence[str], what: str):
    if images.shape[0] != len(prompts):
        raise ValueError(f"{what}: {images.shape[0]} images but {len(prompts)} prompts")
    if images.shape[0] == 0:
        raise ValueError(f"{what}: no images to score")


def clip_score(embedder: ClipEmbedder, images: torch.Tensor, prompts: Sequence[str],
               batch_size: int = 32) -> ScoreResult:
    """Mean over images of 100 * cos(image, its prompt), clamped at 0."""
    _check_pairs(images, prompts, "CLIP score")
    img = _embed_in_batches(embedder.embed_images, images, batch_size)
    txt = _embed_in_batches(embedder.embed_texts, list(prompts), batch_size)
    per = 100.0 * (img * txt).sum(-1)
    return ScoreResult("clip_score", max(float(per.mean()), 0.0), per.tolist(), embedder.backbone)


def pick_score(embedder: ClipEmbedder, images: torch.Tensor, prompts: Sequence[str],
               batch_size: int = 32) -> ScoreResult:
    """Mean over (prompt, image) of logit_scale.exp() * cos(text, image) (PickScore_v1)."""
    _check_pairs(images, prompts, "PickScore")
    img = _embed_in_batches(embedder.embed_images, images, batch_size)
    txt = _embed_in_batches(embedder.embed_texts, list(prompts), batch_size)
    per = embedder.logit_scale * (img * txt).sum(-1)
    return ScoreResult("pick_score", float(per.mean()), per.tolist(), embedder.backbone)


class AestheticMLP(nn.Module):
    """LAION improved aesthetic predictor (v2): linear layers with dropout, no activations."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)


def load_aesthetic_mlp(path) -> AestheticMLP:
    """Load ``sac+logos+ava1-l14-linearMSE.pth`` strictly (a clear error otherwise)."""
    if not path:
        raise FileNotFoundError(f"aesthetic score: no weights file given (set --aesthetic-weights to "
                                f"{AESTHETIC_WEIGHTS_NAME}). Nothing is downloaded.")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"aesthetic weights file not found: {p} (set by --aesthetic-weights; expected "
                                f"{AESTHETIC_WEIGHTS_NAME}). Nothing is downloaded.")
    state = torch.load(p, map_location="cpu", weights_only=True)
    dim = state["layers.0.weight"].shape[1] if "layers.0.weight" in state else 768
    mlp = AestheticMLP(dim)
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{p}: not a LAION aesthetic v2 state_dict: {exc}") from exc
    return mlp.eval()


def aesthetic_score(embedder: ClipEmbedder, mlp: AestheticMLP, images: torch.Tensor,
                    batch_size: int = 32) -> ScoreResult:
    """Mean aesthetic prediction on the normalised image embeddings."""
    if images.shape[0] == 0:
        raise ValueError("aesthetic score: no images to score")
    emb = _embed_in_batches(embedder.embed_images, images, batch_size)
    if emb.shape[1] != mlp.layers[0].in_features:
        raise ValueError(f"aesthetic MLP expects {mlp.layers[0].in_features}-d embeddings (CLIP ViT-L/14), "
                         f"the backbone {embedder.backbone} gives {emb.shape[1]}-d")
    with torch.no_grad():
        per = mlp(emb.to(next(mlp.parameters()).dtype)).squeeze(-1)
    return ScoreResult("aesthetic", float(per.mean()), per.tolist(), embedder.backbone)


def summary(values) -> dict:
    """mean, sample standard deviation and count of per-image values."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}
