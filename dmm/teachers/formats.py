"""Teacher formats: how a teacher UNet is read from disk. A registry, so users can add their own.

Every format is an entry of `TEACHER_FORMATS` (kind "teacher format"): a loader
`fn(path, *, base, allow_pickle, options) -> UNet2DConditionModel`, a one-line description and
a dataclass of typed options (a teacher's `options:` mapping in the recipe). safetensors is the
default everywhere; pickled `.ckpt` files load only when the recipe opts in (`allow_pickle:
true`), and then with `weights_only=True`.

A loader that finds the file unusable raises `TeacherFileError` with what is wrong and how to
fix it; the pool (`dmm.teachers.pool.load_teacher`) adds the teacher's name and path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from dmm.registry import NoOptions, Registry
from dmm.schema import setting

# Original (LDM) single-file checkpoints prefix every UNet key with this.
LDM_UNET_PREFIX = "model.diffusion_model."

Loader = Callable[..., UNet2DConditionModel]
TEACHER_FORMATS: Registry[Loader] = Registry("teacher format")


class TeacherFileError(ValueError):
    """A teacher file or folder that exists but cannot be used; the message says what to do."""


def register_format(name: str, *, description: str, options: type = NoOptions, replace: bool = False):
    """Decorator: register a teacher loader `fn(path, *, base, allow_pickle, options)`."""
    return TEACHER_FORMATS.register(name, description=description, options=options, replace=replace)


def list_formats() -> list[str]:
    """Registered format names, `auto` first."""
    return ["auto", *(n for n in TEACHER_FORMATS.names() if n != "auto")]


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "diffusers"
    if path.suffix == ".safetensors":
        return "single_file"
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return "ckpt"
    raise TeacherFileError(f"cannot tell the format of teacher file {path}; set `format:` to one of {list_formats()}")


def load_teacher_unet(path: str | Path, fmt: str = "auto", *, base: str | Path, allow_pickle: bool = False,
                      dtype: torch.dtype = torch.float32, options: dict | None = None,
                      where: str = "options") -> UNet2DConditionModel:
    """Load a teacher UNet with a registered format; `options` is the raw mapping for its options."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher path does not exist: {path}")
    if fmt == "auto":
        fmt = detect_format(path)
    entry = TEACHER_FORMATS.get(fmt)
    unet = entry.obj(path, base=Path(base), allow_pickle=allow_pickle,
                     options=entry.parse_options(options, where))
    if not isinstance(unet, UNet2DConditionModel):
        raise TeacherFileError(f"teacher format {fmt!r} returned {type(unet).__name__}, "
                               "not a UNet2DConditionModel; fix its loader")
    return unet.to(dtype)


@register_format("auto", description="pick diffusers (folder), single_file (.safetensors) or ckpt from the path")
def _load_auto(path: Path, *, base: Path, allow_pickle: bool, options) -> UNet2DConditionModel:
    return load_teacher_unet(path, detect_format(path), base=base, allow_pickle=allow_pickle)


def unet_folder(path: Path, subfolder: str = "") -> Path:
    """A pipeline folder holds the UNet in `unet/`; a bare UNet folder holds config.json itself."""
    if subfolder:
        if not (path / subfolder / "config.json").is_file():
            raise FileNotFoundError(f"{path / subfolder} has no config.json; check options.subfolder")
        return path / subfolder
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{path} is neither a diffusers pipeline folder (no unet/config.json) nor a UNet folder")


def read_unet_config(folder: Path) -> dict:
    """The UNet's config.json, refused with the reason when it is not valid JSON."""
    file = folder / "config.json"
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TeacherFileError(f"{file} is not valid JSON ({err}); restore it from the original checkpoint") \
            from None
    if not isinstance(config, dict):
        raise TeacherFileError(f"{file} holds {type(config).__name__}, not a UNet config mapping; restore it")
    return config


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, refused clearly when the file is truncated or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TeacherFileError(f"{file.name} is not a readable safetensors file (truncated or corrupt: {reason}); "
                               "re-download or re-export it") from None


def safetensors_shapes(files: list[Path]) -> dict[str, tuple]:
    """Key -> shape from the headers of .safetensors files (no tensor is read), refusing unreadable files."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError, RuntimeError) as err:
            raise TeacherFileError(f"{file} is not a readable safetensors file (truncated or corrupt: {err}); "
                                   "re-download or re-export it") from None
    return shapes


def config_mismatch(config: dict, shapes: dict[str, tuple]) -> str | None:
    """The first tensor where weights and config.json disagree (built on the meta device: no memory)."""
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in UNet2DConditionModel.from_config(config).state_dict().items()}
    for key, shape in wanted.items():
        if key not in shapes:
            return f"{key} is in the config but not in the weights"
        if shapes[key] != shape:
            return f"{key} is {shapes[key]} in the weights, the config wants {shape}"
    extra = next((k for k in shapes if k not in wanted), None)
    return None if extra is None else f"{extra} is in the weights but not in the config"


@dataclass(frozen=True)
class DiffusersOptions:
    subfolder: str = setting("", help="the UNet's folder inside the pipeline folder ('' finds unet/ or the root)")
    variant: str = setting("", help="weights variant to read, e.g. 'fp16' for diffusion_pytorch_model.fp16.*")


@register_format("diffusers", description="a diffusers pipeline folder (unet/) or a bare UNet folder",
                 options=DiffusersOptions)
def _load_diffusers(path: Path, *, base: Path, allow_pickle: bool, options: DiffusersOptions) \
        -> UNet2DConditionModel:
    folder = unet_folder(path, options.subfolder)
    config = read_unet_config(folder)
    has_st = any(folder.glob("*.safetensors"))
    if not has_st and not allow_pickle:
        raise TeacherFileError(f"{folder} has no .safetensors weights; pickled weights load only with "
                               "allow_pickle: true")
    if has_st:
        variant = f".{options.variant}" if options.variant else ""
        files = [f for f in sorted(folder.glob("*.safetensors"))
                 if (variant in f.stem if variant else "." not in f.stem)]
        problem = config_mismatch(config, safetensors_shapes(files))
        if problem is not None:
            raise TeacherFileError(f"the weights in {folder} do not fit its config.json: {problem}; restore the "
                                   "config.json that came with these weights")
    try:
        return UNet2DConditionModel.from_pretrained(folder, use_safetensors=has_st, local_files_only=True,
                                                    variant=options.variant or None)
    except (ValueError, RuntimeError, OSError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split()).split(". ")[0]
        raise TeacherFileError(f"the weights in {folder} do not fit its config.json ({reason}); "
                               "restore the config.json that came with these weights") from None


def _from_state_dict(state: dict, *, base: Path, source: Path) -> UNet2DConditionModel:
    """A single-file UNet: LDM key layout (converted by diffusers) or diffusers key layout."""
    config_folder = unet_folder(base)
    if any(k.startswith(LDM_UNET_PREFIX) for k in state):
        return UNet2DConditionModel.from_single_file(
            str(source), config=str(config_folder.parent if config_folder != base else base),
            subfolder="unet" if config_folder != base else "", local_files_only=True,
        )
    unet = UNet2DConditionModel.from_config(read_unet_config(config_folder))
    own = unet.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise TeacherFileError(
            f"{source.name}: keys do not match the base UNet's layout (missing e.g. {missing[:2]}, "
            f"unexpected e.g. {unexpected[:2]}); set options.key_prefix if the keys carry a prefix"
        )
    wrong = next((k for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)), None)
    if wrong is not None:
        raise TeacherFileError(f"{source.name}: tensor {wrong} has shape {tuple(state[wrong].shape)} but the base "
                               f"UNet's config wants {tuple(own[wrong].shape)}; is it a fine-tune of this base?")
    unet.load_state_dict(state, strict=True)
    return unet


def _strip_prefix(state: dict, prefix: str, source: Path) -> dict:
    if not prefix:
        return state
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not kept:
        raise TeacherFileError(f"{source.name}: no key starts with options.key_prefix {prefix!r} "
                               f"(keys look like {sorted(state)[:2]})")
    return kept


@dataclass(frozen=True)
class SingleFileOptions:
    key_prefix: str = setting("", help="strip this prefix from every key (e.g. 'unet.'); LDM files are "
                                       "recognised without it")


@register_format("single_file", description="one .safetensors file in diffusers or original (LDM) key layout",
                 options=SingleFileOptions)
def _load_single_file(path: Path, *, base: Path, allow_pickle: bool, options: SingleFileOptions) \
        -> UNet2DConditionModel:
    if path.suffix != ".safetensors":
        raise TeacherFileError(f"{path}: single_file teachers are .safetensors; use format: ckpt for pickled files")
    state = _strip_prefix(read_safetensors(path), options.key_prefix, path)
    return _from_state_dict(state, base=base, source=path)


@dataclass(frozen=True)
class CkptOptions:
    state_key: str = setting("state_dict", help="the entry that holds the weights when the file nests them")
    key_prefix: str = setting("", help="strip this prefix from every key (e.g. 'unet.')")


@register_format("ckpt", description="a pickled torch checkpoint in diffusers key layout (needs allow_pickle)",
                 options=CkptOptions)
def _load_ckpt(path: Path, *, base: Path, allow_pickle: bool, options: CkptOptions) -> UNet2DConditionModel:
    if not allow_pickle:
        raise TeacherFileError(
            f"{path} is a pickled checkpoint; set `allow_pickle: true` on this teacher to load it "
            "(it is read with torch.load(weights_only=True)), or convert it to .safetensors"
        )
    import pickle

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise  # weights_only refused an object: its message says which
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise TeacherFileError(f"{path.name} is not a readable torch checkpoint (truncated or corrupt: {reason}); "
                               "re-download or re-export it") from None
    if not isinstance(state, dict):
        raise TeacherFileError(f"{path.name} holds {type(state).__name__}, not a state dict")
    state = state.get(options.state_key, state)
    state = _strip_prefix(state, options.key_prefix, path)
    if any(k.startswith(LDM_UNET_PREFIX) for k in state):
        raise TeacherFileError(f"{path}: convert LDM-layout .ckpt files to .safetensors first (diffusers reads those)")
    return _from_state_dict(state, base=base, source=path)


__all__ = ["LDM_UNET_PREFIX", "TEACHER_FORMATS", "TeacherFileError", "detect_format", "list_formats",
           "load_teacher_unet", "read_safetensors", "read_unet_config", "register_format", "unet_folder"]
