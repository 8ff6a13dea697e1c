"""Diffusers -> original (LDM/SGM) state dicts, by inverting diffusers' own converters.

diffusers ships only the original -> diffusers direction in the package
(`diffusers.loaders.single_file_utils`); its diffusers -> original scripts are not importable.
So the map is derived, never hand-kept: sd-mecha's model config lists every original key (with
its shape), each key gets a small tagged stand-in tensor (key index and row numbers), diffusers'
converter runs on the stand-ins, and where each tag lands says which original key (and which
rows of it, and whether transposed) a diffusers tensor came from. Inverting that is exact, and
it follows both libraries when they change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmm.models.arch import Arch

_ROW_BITS = 20  # a tag is key_index << _ROW_BITS | row; 2**20 rows > any original tensor's first dim


@dataclass(frozen=True)
class Source:
    """Where one diffusers tensor lives in the original layout."""

    key: str  # the original key
    row: int  # its first row there (OpenCLIP packs q, k, v into one in_proj tensor)
    transposed: bool  # OpenCLIP's text_projection is stored transposed
    ndim: int  # the original's ndim (the VAE's attention projections are 1x1 convolutions there)


def original_keys(arch: Arch, component: str) -> dict:
    """sd-mecha's original-layout keys (name -> KeyMetadata) of one of the arch's components."""
    from sd_mecha.extensions import model_configs

    return dict(model_configs.resolve(arch.single_file_config).components()[component].keys())


def _tags(keys: dict) -> dict[str, torch.Tensor]:
    tags = {}
    for i, (key, meta) in enumerate(sorted(keys.items())):
        shape = tuple(meta.shape)
        rows = shape[0] if shape else 1
        tag = (i << _ROW_BITS) + torch.arange(rows, dtype=torch.int64)
        tags[key] = tag[:, None] if len(shape) >= 2 else tag
    return tags


def _run_converter(component: str, tags: dict, model) -> dict:
    """diffusers' original -> diffusers converter for one sd-mecha component."""
    from diffusers.loaders import single_file_utils as sfu

    if component == "diffuser":
        return sfu.convert_ldm_unet_checkpoint(tags, dict(model.config))
    if component == "vae":
        return sfu.convert_ldm_vae_checkpoint(tags, dict(model.config))
    if component == "clip_l":
        return sfu.convert_ldm_clip_checkpoint(tags)
    if component == "clip_g":
        prefix = next(k for k in tags if k.endswith(".text_projection")).removesuffix("text_projection")
        return sfu.convert_open_clip_checkpoint(model, tags, prefix=prefix)
    raise ValueError(f"no diffusers converter known for the sd-mecha component {component!r}")


def key_map(arch: Arch, component: str, model) -> dict[str, Source | None]:
    """Each of `model`'s state-dict keys -> its `Source` in the original layout (None: no place there).
    Cheap (stand-ins have one column), so computed per call rather than cached."""
    keys = original_keys(arch, component)
    names = sorted(keys)
    converted = _run_converter(component, _tags(keys), model)
    mapping: dict[str, Source] = {}
    for diffusers_key, tag in converted.items():
        transposed = tag.ndim == 2 and tag.shape[0] == 1 and tag.shape[1] > 1
        first = int(tag.reshape(-1)[0])
        name = names[first >> _ROW_BITS]
        mapping[diffusers_key] = Source(name, first & ((1 << _ROW_BITS) - 1), transposed, len(keys[name].shape))
    # transformers >= 5 dropped CLIPTextModel's `text_model.` level; diffusers' converter still writes it
    return {k: mapping[k] if k in mapping else mapping.get(f"text_model.{k}") for k in model.state_dict()}


def to_original(arch: Arch, component: str, model, state: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
    """`model`'s weights (or `state`, in its keys) in the original layout of `arch`'s `component`."""
    state = model.state_dict() if state is None else state
    mapping = key_map(arch, component, model)
    unplaced = [k for k in state if mapping.get(k) is None]
    if unplaced:
        raise ValueError(f"{len(unplaced)} {component} tensors have no place in the {arch.single_file_config} layout "
                         f"(e.g. {unplaced[:3]}): this model is not a stock {arch.name} component")
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    ndim: dict[str, int] = {}
    for key, value in state.items():
        src = mapping[key]
        pieces.setdefault(src.key, []).append((src.row, value.T if src.transposed else value))
        ndim[src.key] = src.ndim
    out = {}
    for name, parts in pieces.items():
        tensor = parts[0][1] if len(parts) == 1 else torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])])
        while tensor.ndim < ndim[name]:
            tensor = tensor.unsqueeze(-1)
        out[name] = tensor.contiguous()
    return out
