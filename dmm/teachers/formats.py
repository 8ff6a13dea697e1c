"""Teacher formats: how a teacher UNet is read from disk. A registry, so users can add their own.

Every format returns a `UNet2DConditionModel`. safetensors is the default everywhere; pickled
`.ckpt` files load only when the recipe opts in (`allow_pickle: true`), and then with
`weights_only=True`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

# Original (LDM) single-file checkpoints prefix every UNet key with this.
LDM_UNET_PREFIX = "model.diffusion_model."

Loader = Callable[..., UNet2DConditionModel]
_FORMATS: dict[str, Loader] = {}


def register_format(name: str):
    def wrap(fn: Loader) -> Loader:
        _FORMATS[name] = fn
        return fn

    return wrap


def list_formats() -> list[str]:
    return ["auto", *sorted(_FORMATS)]


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "diffusers"
    if path.suffix == ".safetensors":
        return "single_file"
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return "ckpt"
    raise ValueError(f"cannot tell the format of teacher file {path}; set `format:` to one of {list_formats()}")


def load_teacher_unet(path: str | Path, fmt: str = "auto", *, base: str | Path, allow_pickle: bool = False,
                      dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher path does not exist: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in _FORMATS:
        raise ValueError(f"unknown teacher format {fmt!r}; registered formats: {list_formats()}")
    unet = _FORMATS[fmt](path, base=Path(base), allow_pickle=allow_pickle)
    return unet.to(dtype)


def unet_folder(path: Path) -> Path:
    """A pipeline folder holds the UNet in `unet/`; a bare UNet folder holds config.json itself."""
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{path} is neither a diffusers pipeline folder (no unet/config.json) nor a UNet folder")


@register_format("diffusers")
def _load_diffusers(path: Path, *, base: Path, allow_pickle: bool) -> UNet2DConditionModel:
    folder = unet_folder(path)
    has_st = any(folder.glob("*.safetensors"))
    if not has_st and not allow_pickle:
        raise ValueError(f"{folder} has no .safetensors weights; pickled weights load only with allow_pickle: true")
    return UNet2DConditionModel.from_pretrained(folder, use_safetensors=has_st, local_files_only=True)


def _from_state_dict(state: dict, *, base: Path, source: Path) -> UNet2DConditionModel:
    """A single-file UNet: LDM key layout (converted by diffusers) or diffusers key layout."""
    config_folder = unet_folder(base)
    if any(k.startswith(LDM_UNET_PREFIX) for k in state):
        return UNet2DConditionModel.from_single_file(
            str(source), config=str(config_folder.parent if config_folder != base else base),
            subfolder="unet" if config_folder != base else "", local_files_only=True,
        )
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_folder))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: keys do not match the base UNet's layout (missing e.g. {missing[:2]}, "
            f"unexpected e.g. {unexpected[:2]})"
        )
    return unet


@register_format("single_file")
def _load_single_file(path: Path, *, base: Path, allow_pickle: bool) -> UNet2DConditionModel:
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single_file teachers are .safetensors; use format: ckpt for pickled files")
    return _from_state_dict(load_file(str(path)), base=base, source=path)


@register_format("ckpt")
def _load_ckpt(path: Path, *, base: Path, allow_pickle: bool) -> UNet2DConditionModel:
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickled checkpoint; set `allow_pickle: true` on this teacher to load it "
            "(it is read with torch.load(weights_only=True)), or convert it to .safetensors"
        )
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if any(k.startswith(LDM_UNET_PREFIX) for k in state):
        raise ValueError(f"{path}: convert LDM-layout .ckpt files to .safetensors first (diffusers reads those)")
    return _from_state_dict(state, base=base, source=path)
