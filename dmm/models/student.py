"""The style-promptable student: a stock diffusers UNet with a learned style codebook.

The codebook sits in the UNet's own `class_embedding` slot, whose output the stock forward adds
to the time embedding, so it reaches every ResNet block without a forked forward. The UNet also
holds a current style as state: stock pipelines (which never pass `class_labels`) then generate
in that style unchanged; `set_style` also takes one style per image, repeated for the
classifier-free-guidance half of the batch.

This module imports only the standard library, torch and diffusers: a merged-model export ships
its source as the UNet's diffusers custom-component file (`unet/style_unet.py`), so the folder
loads with `trust_remote_code=True` where dmm is not installed. Keep it self-contained.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import nn

StyleSpec = str | int | Mapping[str, float] | Sequence | torch.Tensor
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class StyleCodebook(nn.Module):
    """`Embedding(N, d)` followed by `Linear-SiLU-Linear`; mixtures interpolate the embeddings."""

    def __init__(self, num_styles: int, dim: int):
        super().__init__()
        self.codebook = nn.Embedding(num_styles, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        # Zero last layer: the untrained student starts exactly as the base UNet.
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.held: torch.Tensor | None = None  # set by StyleUNet2DConditionModel.set_style

    @property
    def num_styles(self) -> int:
        return self.codebook.num_embeddings

    def embed(self, style: torch.Tensor) -> torch.Tensor:
        """Indices (B,) pick rows; weights (B, N) mix rows before the MLP, as in the paper."""
        if style.dtype in INDEX_DTYPES:
            return self.codebook(style.long())
        return style.to(self.codebook.weight.dtype) @ self.codebook.weight

    def forward(self, style: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(style))

    def grow(self, extra: int) -> None:
        """Append `extra` randomly initialised rows (incremental merging); old rows are kept."""
        old = self.codebook.weight.data
        new = nn.Embedding(old.shape[0] + extra, old.shape[1]).to(old.device, old.dtype)
        new.weight.data[: old.shape[0]] = old
        self.codebook = new


def resolve_style(style: StyleSpec, style_names: Sequence[str], batch: int | None = None) -> torch.Tensor:
    """Turn a user's style request into indices (B,) or mixing weights (B, N).

    Accepts a name, an index, a {name: weight} mapping, a weight vector of length N, a list of
    per-sample names/indices, or a tensor of indices (B,) / weights (B, N).
    """
    n = len(style_names)

    def index_of(s) -> int:
        if isinstance(s, str):
            if s not in style_names:
                raise ValueError(f"unknown style {s!r}; known styles: {list(style_names)}")
            return style_names.index(s)
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"a style is a name or an index, got {s!r}")
        if not 0 <= s < n:
            raise ValueError(f"style index {s} out of range: this model has {n} styles {list(style_names)}")
        return s

    if isinstance(style, torch.Tensor):
        if style.is_floating_point():
            out = style.reshape(-1, n) if style.dim() == 1 else style
            _check_weights(out, style_names)
        else:
            out = style.long().reshape(-1)
            if out.numel() and (out.min() < 0 or out.max() >= n):
                raise ValueError(f"style indices must lie in [0, {n}); this model has styles {list(style_names)}")
    elif isinstance(style, (str, int)):
        out = torch.tensor([index_of(style)])
    elif isinstance(style, Mapping):
        w = torch.zeros(1, n)
        for name, weight in style.items():
            w[0, index_of(name)] = float(weight)
        _check_weights(w, style_names)
        out = w
    elif isinstance(style, Sequence) and len(style) > 0 and all(isinstance(s, float) for s in style):
        if len(style) != n:
            raise ValueError(f"mixing weights need one value per style ({n}: {list(style_names)}), got {len(style)}")
        out = torch.tensor([list(style)], dtype=torch.float32)
        _check_weights(out, style_names)
    elif isinstance(style, Sequence) and len(style) > 0 and any(isinstance(s, Mapping) for s in style):
        # one style per image, some of them mixtures: every row becomes a weight vector
        out = torch.cat([resolve_style(s, style_names) if isinstance(s, Mapping)
                         else nn.functional.one_hot(torch.tensor([index_of(s)]), n).float() for s in style])
    elif isinstance(style, Sequence) and len(style) > 0:
        out = torch.tensor([index_of(s) for s in style])
    else:
        raise TypeError(f"cannot read a style from {style!r}")
    if batch is not None and out.shape[0] != batch:
        if out.shape[0] != 1:
            raise ValueError(f"got styles for {out.shape[0]} samples but the batch has {batch}")
        out = out.expand(batch, *out.shape[1:])
    return out


def _check_weights(w: torch.Tensor, style_names: Sequence[str]) -> None:
    if w.shape[-1] != len(style_names):
        raise ValueError(f"mixing weights need {len(style_names)} values ({list(style_names)}), got {w.shape[-1]}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"mixing weights must be finite and non-negative, got {w.tolist()}")
    sums = w.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        raise ValueError(f"mixing weights must sum to 1, got sums {sums.tolist()} (normalise them first)")


def _with_style_params(init):
    """Give the subclass __init__ the full UNet signature plus `style_names`, so diffusers'
    config machinery records and restores every argument."""
    parent = inspect.signature(UNet2DConditionModel.__init__)
    params = list(parent.parameters.values())
    params.append(inspect.Parameter("style_names", inspect.Parameter.KEYWORD_ONLY, default=()))
    init.__signature__ = parent.replace(parameters=params)
    return init


class StyleUNet2DConditionModel(UNet2DConditionModel):
    """`UNet2DConditionModel` + style codebook; `config.style_names` names the styles in order."""

    @register_to_config
    @_with_style_params
    def __init__(self, *args, style_names: Sequence[str] = (), **kwargs):
        kwargs.pop("num_class_embeds", None)
        kwargs.pop("class_embed_type", None)
        super().__init__(*args, **kwargs)
        names = list(style_names)
        if not names:
            raise ValueError("a style UNet needs at least one style name (style_names=[...])")
        if len(set(names)) != len(names):
            raise ValueError(f"style names must be unique, got {names}")
        # the time embedding's width, as dmm.models.arch.time_embed_dim reads it (no dmm import here)
        self.class_embedding = StyleCodebook(len(names), self.time_embedding.linear_2.out_features)

    @property
    def style_names(self) -> list[str]:
        return list(self.config.style_names)

    def add_styles(self, names: Sequence[str]) -> None:
        """Append new styles (incremental merging): new random codebook rows, every old row kept."""
        names = list(names)
        if not names:
            return
        clash = sorted(set(names) & set(self.style_names))
        if clash or len(set(names)) != len(names):
            raise ValueError(f"new style names must be new and unique; {clash or names} already taken")
        self.class_embedding.grow(len(names))
        self.register_to_config(style_names=[*self.style_names, *names])

    @property
    def style_prompts(self) -> StyleCodebook:
        return self.class_embedding

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, style_names: Sequence[str]) -> StyleUNet2DConditionModel:
        """A student initialised from a base UNet: every base weight copied, the codebook random."""
        config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        student = cls(**config, style_names=list(style_names))
        missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
        bad = [k for k in missing if not k.startswith("class_embedding.")]
        if bad or unexpected:
            raise ValueError(f"base UNet does not match its own config: missing {bad[:3]}, unexpected {unexpected[:3]}")
        return student if unet.dtype == student.dtype else student.to(unet.dtype)

    @classmethod
    def from_merged(cls, unet_dir: str, config_overrides: dict | None = None) -> StyleUNet2DConditionModel:
        """A merged student from its folder. Config overrides give it inputs the folder's lacks (SPLAM's
        `time_cond_proj_dim`): the layers they add start at zero, so the model computes what it did."""
        unet = cls.from_pretrained(str(unet_dir), local_files_only=True)
        overrides = {k: v for k, v in (config_overrides or {}).items() if unet.config.get(k) != v}
        if not overrides:
            return unet
        config = {**{k: v for k, v in dict(unet.config).items() if not k.startswith("_")}, **overrides}
        grown = cls(**config)
        missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"{unet_dir}: the config overrides {sorted(overrides)} drop weights {unexpected[:3]}")
        with torch.no_grad():
            for name in missing:
                grown.get_parameter(name).zero_()
        return grown

    def set_style(self, style: StyleSpec | None) -> None:
        """Hold a style for calls without `class_labels` (stock pipelines). None clears it.

        One style or mixture applies to the whole batch. A list gives one style per image, in the
        pipeline's output order (prompt 0's `num_images_per_prompt` images first, then prompt 1's);
        under classifier-free guidance the UNet sees that batch twice and repeats the list."""
        if style is None:
            self.class_embedding.held = None
            return
        self.class_embedding.held = resolve_style(style, self.style_names)

    def _held_for(self, batch: int) -> torch.Tensor:
        held = self.class_embedding.held
        if held is None:
            raise ValueError(
                f"no style chosen: call unet.set_style(name) first or pass class_labels; styles: {self.style_names}"
            )
        k = held.shape[0]
        if k == 1 or k == batch:
            return held.expand(batch, *held.shape[1:])
        if 2 * k == batch:  # classifier-free guidance: [unconditional half, conditional half]
            return torch.cat([held, held])
        raise ValueError(
            f"set_style was given {k} per-image styles but the UNet got a batch of {batch} "
            f"({batch} images, or {batch / 2:g} doubled by classifier-free guidance): give one style per "
            "image (prompts x num_images_per_prompt), or one style for all"
        )

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, **kwargs):
        """`class_labels`: per-sample styles (indices (B,), mixing weights (B, N), or one style for the
        whole batch), checked like `set_style` so a bad one fails here, not as a wrong embedding."""
        if class_labels is None:
            class_labels = self._held_for(sample.shape[0]).to(sample.device)
        else:
            class_labels = self._check_class_labels(class_labels, sample.shape[0]).to(sample.device)
        return super().forward(sample, timestep, encoder_hidden_states, class_labels=class_labels, **kwargs)

    def _check_class_labels(self, class_labels, batch: int) -> torch.Tensor:
        if isinstance(class_labels, torch.Tensor):
            floating, integer = class_labels.is_floating_point(), class_labels.dtype in INDEX_DTYPES
            if not (floating and class_labels.dim() in (1, 2) or integer and class_labels.dim() in (0, 1)):
                raise ValueError(f"class_labels must be style indices (B,) or mixing weights (B, "
                                 f"{len(self.style_names)}), got {class_labels.dtype} of shape "
                                 f"{tuple(class_labels.shape)}")
        return resolve_style(class_labels, self.style_names, batch=batch)

    def bake(self, style: StyleSpec) -> UNet2DConditionModel:
        """A plain UNet that always generates `style`: the style vector folded into the time MLP's
        last bias. Exact, because the style vector is a per-sample constant added to that output."""
        weights = resolve_style(style, self.style_names)
        if weights.shape[0] != 1:
            raise ValueError(f"bake takes one style or one mixture, got {weights.shape[0]} styles (one per image "
                             "is for set_style)")
        with torch.no_grad():
            vec = self.class_embedding(weights.to(self.device))[0]
        config = {k: v for k, v in dict(self.config).items() if not k.startswith("_") and k != "style_names"}
        plain = UNet2DConditionModel(**config).to(self.device, self.dtype)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("class_embedding.")}
        state["time_embedding.linear_2.bias"] = state["time_embedding.linear_2.bias"] + vec.to(self.dtype)
        plain.load_state_dict(state, strict=True)
        return plain
