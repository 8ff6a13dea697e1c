"""Teacher formats: how a teacher (its UNet, and its own text encoders when it has some) is read
from disk. A registry, so users can add their own.

Every format is an entry of `TEACHER_FORMATS` (kind "teacher format"): a loader
`fn(path, *, base, allow_pickle, options) -> UNet2DConditionModel | TeacherParts`, a one-line
description and a dataclass of typed options (a teacher's `options:` mapping in the recipe). A
loader may also take `dtype` (load straight into it: no second copy) and `text_encoder` (the
recipe's policy, below); `load_teacher_parts` passes them only to loaders that name them.
safetensors is the default everywhere; pickled `.ckpt` files load only when the recipe opts in
(`allow_pickle: true`), and then with `weights_only=True`.

Text encoders (`text_encoder:` of a teacher): `base` always conditions the teacher through the
base's encoders; `own` requires the teacher's own (kept even when they equal the base's); `auto`
keeps each of the teacher's encoders that differs from the base's, compared tensor by tensor at
the coarser of the two stored precisions (an fp16 copy of the base's fp32 encoder is the base's).

Memory: built-in formats read safetensors tensor by tensor into a model allocated empty in the
teacher dtype, releasing the file's mapped pages every `RELEASE_BYTES`, and skip what the teacher
does not need (VAE, EMA copies, text encoders under `base`): peak memory stays near the teacher's
own size (BENCHMARKS.md, "Teacher loading memory"). Original-layout (LDM/SGM) single files are
converted with diffusers' single-file converters and the base's local configs (never the hub):
the converters run once on key names to learn where each tensor goes, then tensors stream in.

A loader that finds the file unusable raises `TeacherFileError` with what is wrong and how to
fix it; the pool (`dmm.teachers.pool.load_teacher`) adds the teacher's name and path.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from dmm.models.arch import detect_arch
from dmm.registry import NoOptions, Registry
from dmm.schema import setting

# The original (LDM/SGM) single-file layout: which keys hold which pipeline component. diffusers'
# converters do the renaming; these prefixes only choose what a teacher reads.
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_EMA_PREFIX = "model_ema."
LDM_TEXT_ENCODERS = {  # arch -> (pipeline component, key prefix, diffusers converter) per encoder
    "sd15": (("text_encoder", "cond_stage_model.transformer.", "clip"),),
    "sdxl": (("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip")),
}
# Only SDXL's UNet has the pooled-text/size-id embedding (`label_emb`) and SGM's `conditioner`.
LDM_SDXL_MARKERS = (LDM_UNET_PREFIX + "label_emb.", "conditioner.embedders.")
ARCH_TITLES = {"sd15": "SD1.5", "sdxl": "SDXL"}
TEXT_ENCODER_POLICIES = ("auto", "own", "base")
# Mapped file pages count as resident memory until unmapped: reopen the file after this many bytes.
RELEASE_BYTES = 256 << 20

Loader = Callable[..., "UNet2DConditionModel | TeacherParts"]
TEACHER_FORMATS: Registry[Loader] = Registry("teacher format")


class TeacherFileError(ValueError):
    """A teacher file or folder that exists but cannot be used; the message says what to do."""


@dataclass
class TeacherParts:
    """What a teacher brings: its UNet and, when it has its own, text encoders (None: the base's)."""

    unet: UNet2DConditionModel
    text_encoder: nn.Module | None = None
    text_encoder_2: nn.Module | None = None

    def encoders(self) -> dict[str, nn.Module]:
        return {n: m for n, m in (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2))
                if m is not None}


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


def load_teacher_parts(path: str | Path, fmt: str = "auto", *, base: str | Path, allow_pickle: bool = False,
                       dtype: torch.dtype = torch.float32, options: dict | None = None, where: str = "options",
                       text_encoder: str = "auto") -> TeacherParts:
    """Load a teacher with a registered format; `options` is the raw mapping for its options and
    `text_encoder` the policy (auto | own | base) for the teacher's own text encoders."""
    path, base = Path(path), Path(base)
    if not path.exists():
        raise FileNotFoundError(f"teacher path does not exist: {path}")
    if text_encoder not in TEXT_ENCODER_POLICIES:
        raise TeacherFileError(f"text_encoder must be one of {TEXT_ENCODER_POLICIES}, got {text_encoder!r}")
    if fmt == "auto":
        fmt = detect_format(path)
    entry = TEACHER_FORMATS.get(fmt)
    accepts = inspect.signature(entry.obj).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepts.values())
    extra = {k: v for k, v in (("dtype", dtype), ("text_encoder", text_encoder)) if takes_all or k in accepts}
    got = entry.obj(path, base=base, allow_pickle=allow_pickle, options=entry.parse_options(options, where), **extra)
    parts = got if isinstance(got, TeacherParts) else TeacherParts(got)
    if not isinstance(parts.unet, UNet2DConditionModel):
        raise TeacherFileError(f"teacher format {fmt!r} returned {type(parts.unet).__name__}, "
                               "not a UNet2DConditionModel; fix its loader")
    if "text_encoder" not in extra:  # the loader brought what it had: apply the policy here
        parts = _apply_policy(parts, text_encoder, base, path)
    for module in (parts.unet, *parts.encoders().values()):
        if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
            module.to(dtype)
    return parts


def load_teacher_unet(path: str | Path, fmt: str = "auto", *, base: str | Path, allow_pickle: bool = False,
                      dtype: torch.dtype = torch.float32, options: dict | None = None,
                      where: str = "options") -> UNet2DConditionModel:
    """The teacher's UNet alone (its text encoders, if any, are not read)."""
    return load_teacher_parts(path, fmt, base=base, allow_pickle=allow_pickle, dtype=dtype, options=options,
                              where=where, text_encoder="base").unet


def _apply_policy(parts: TeacherParts, policy: str, base: Path, source: Path) -> TeacherParts:
    """The policy applied to encoders a (user) loader returned."""
    if policy == "base":
        return TeacherParts(parts.unet)
    if policy == "own" and not parts.encoders():
        raise TeacherFileError(_no_own_encoder(source))
    if policy == "auto":
        for name, module in parts.encoders().items():
            reference = _base_encoder_reader(base, name)
            items = iter(module.state_dict().items())
            if reference is not None and not _differs(items, reference):
                setattr(parts, name, None)
    return parts


def _no_own_encoder(source: Path, name: str = "text encoder") -> str:
    return (f"text_encoder: own, but {source.name} brings no {name} of its own; use text_encoder: auto (its "
            "own when it has one) or base")


@register_format("auto", description="pick diffusers (folder), single_file (.safetensors) or ckpt from the path")
def _load_auto(path: Path, *, base: Path, allow_pickle: bool, options, dtype: torch.dtype = torch.float32,
               text_encoder: str = "auto") -> TeacherParts:
    return load_teacher_parts(path, detect_format(path), base=base, allow_pickle=allow_pickle, dtype=dtype,
                              text_encoder=text_encoder)


# ----------------------------------------------------------------------------- folders and configs
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


def read_json(file: Path, what: str = "UNet config") -> dict:
    """A config JSON mapping, refused with the reason when it is not valid JSON."""
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TeacherFileError(f"{file} is not valid JSON ({err}); restore it from the original checkpoint") \
            from None
    if not isinstance(config, dict):
        raise TeacherFileError(f"{file} holds {type(config).__name__}, not a {what} mapping; restore it")
    return config


def read_unet_config(folder: Path) -> dict:
    """The UNet's config.json, refused with the reason when it is not valid JSON."""
    return read_json(folder / "config.json")


def weight_files(folder: Path, variant: str = "") -> list[Path]:
    """The .safetensors weights of a diffusers model folder (all shards), of one variant or none."""
    tag = f".{variant}" if variant else ""
    return [f for f in sorted(folder.glob("*.safetensors")) if (tag in f.stem if tag else "." not in f.stem)]


@contextmanager
def _quiet(name: str = "diffusers"):
    """diffusers' converters log EMA/legacy notes meant for its own CLI; our errors say what matters."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def empty_model(factory: Callable[[], nn.Module]) -> nn.Module:
    """A model whose parameters take no memory yet (meta device); buffers are built normally."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def _meta_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- reading tensors
class Reader:
    """Key -> shape, and `read(key, dtype)` giving a private copy of one tensor."""

    shapes: dict[str, tuple]

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def release(self) -> None:
        """Let go of what reading kept mapped (nothing, for a state already in memory)."""


class TensorReader(Reader):
    """Tensors of one or more .safetensors files, read one at a time: shapes come from the headers,
    and the file's mapped pages are released every `RELEASE_BYTES` so they never pile up."""

    def __init__(self, files: list[Path], full_paths: bool = True):
        self.files = list(files)
        self.full_paths = full_paths  # a single-file teacher's path is already in the message
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple] = {}
        self._open: dict[Path, object] = {}
        self._read = 0
        for file in self.files:
            handle = self._handle(file)
            for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                self.where[key] = file
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())
        self.release()

    def _handle(self, file: Path):
        from safetensors import SafetensorError, safe_open

        if file not in self._open:
            try:
                self._open[file] = safe_open(str(file), "pt")
            except (SafetensorError, OSError, RuntimeError) as err:
                raise unreadable(file, err, self.full_paths) from None
        return self._open[file]

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A private copy of one tensor (in `dtype` when given)."""
        from safetensors import SafetensorError

        file = self.where[key]
        try:
            mapped = self._handle(file).get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise unreadable(file, err, self.full_paths) from None
        tensor = mapped.to(dtype or mapped.dtype, copy=True)
        self._read += tensor.numel() * mapped.element_size()
        if self._read >= RELEASE_BYTES:
            self.release()
        return tensor

    def release(self) -> None:
        self._open.clear()  # safe_open unmaps the file when its handle goes
        self._read = 0


class DictReader(Reader):
    """The same interface over a state dict already in memory (pickled checkpoints)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        value = self.state[key]
        return value.to(dtype or value.dtype, copy=True)


def unreadable(file: Path, err: BaseException, full_path: bool = False) -> TeacherFileError:
    text = str(err).strip()
    reason = text.splitlines()[0] if text else type(err).__name__
    return TeacherFileError(f"{file if full_path else file.name} is not a readable safetensors file (truncated or "
                            f"corrupt: {reason}); re-download or re-export it")


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, refused clearly when the file is truncated or not one."""
    reader = TensorReader([file], full_paths=False)
    return {k: reader.read(k) for k in reader}


def safetensors_shapes(files: list[Path]) -> dict[str, tuple]:
    """Key -> shape from the headers of .safetensors files (no tensor is read), refusing unreadable files."""
    return TensorReader(files).shapes


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=value.is_floating_point())
    else:
        module._buffers[name] = value


def stream_into(model: nn.Module, items: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype,
                source: Path, what: str) -> nn.Module:
    """Fill an empty model from (key, tensor) pairs; every parameter must be given exactly."""
    wanted = _meta_shapes(model)
    for key, value in items:
        key = model_key(key, wanted)
        if key not in wanted:
            if key.endswith("position_ids"):  # a buffer older transformers saved; the model builds its own
                continue
            raise TeacherFileError(f"{source.name}: {key} is not a tensor of the base's {what}; is this a "
                                   "fine-tune of the base?")
        if tuple(value.shape) != wanted[key]:
            raise TeacherFileError(f"{source.name}: {what} tensor {key} has shape {tuple(value.shape)} but the "
                                   f"base's {what} has {wanted[key]}; is this a fine-tune of the base?")
        _assign(model, key, value.to(dtype) if value.is_floating_point() else value)
    empty = [k for k, v in model.named_parameters() if v.is_meta]
    if empty:
        raise TeacherFileError(f"{source.name}: the {what} has no tensor for {empty[0]} ({len(empty)} missing); "
                               "is this a fine-tune of the base?")
    return model.eval()


def model_key(key: str, wanted) -> str:
    """transformers 5 flattened CLIPTextModel (no `text_model.` level); files written before keep it."""
    flat = key.removeprefix("text_model.")
    return flat if key not in wanted and flat in wanted else key


def shape_mismatch(want: dict[str, tuple], have: dict[str, tuple], theirs: str = "teacher",
                   ours: str = "base") -> str | None:
    """The first key (in `want`'s order) missing from `have` or shaped differently, or None."""
    for key, shape in want.items():
        if key not in have:
            return f"{key} is in the {ours} but not in the {theirs}"
        if have[key] != shape:
            return f"{key} is {have[key]} in the {theirs}, the {ours} wants {shape}"
    extra = next((k for k in have if k not in want), None)
    return None if extra is None else f"{extra} is in the {theirs} but not in the {ours}"


def config_mismatch(config: dict, shapes: dict[str, tuple]) -> str | None:
    """The first tensor where weights and config.json disagree (built on the meta device: no memory)."""
    with torch.device("meta"):
        wanted = _meta_shapes(UNet2DConditionModel.from_config(config))
    return shape_mismatch(wanted, shapes, theirs="weights", ours="config")


# ----------------------------------------------------------------------------- text encoders
def _encoder_class(base: Path, name: str):
    """The base pipeline's class for text encoder `name` (model_index.json), or None without one."""
    index = base / "model_index.json"
    if not index.is_file():
        return None
    entry = read_json(index, "pipeline index").get(name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        return None
    return getattr(importlib.import_module(entry[0]), entry[1])


def base_encoders(base: Path) -> list[str]:
    """The text encoders the base pipeline has (text_encoder, text_encoder_2)."""
    return [n for n in ("text_encoder", "text_encoder_2") if _encoder_class(base, n) is not None]


def empty_encoder(base: Path, name: str, config_folder: Path | None = None) -> nn.Module:
    """Text encoder `name` of the base's class, from `config_folder` (default: the base's own config)."""
    cls = _encoder_class(base, name)
    folder = config_folder or base / name
    config = cls.config_class.from_pretrained(str(folder), local_files_only=True)
    return empty_model(lambda: cls(config))


def _base_encoder_reader(base: Path, name: str) -> TensorReader | None:
    files = weight_files(base / name)
    return TensorReader(files) if files else None


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    if not (a.is_floating_point and b.is_floating_point):
        return a
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _differs(items: Iterator[tuple[str, torch.Tensor]], base: TensorReader) -> bool:
    """Whether any tensor differs from the base's (at the coarser of the two stored precisions)."""
    names = {k.removeprefix("text_model."): k for k in base if not k.endswith("position_ids")}
    seen = 0
    for key, value in items:
        if key.endswith("position_ids"):
            continue
        theirs_key = names.get(key.removeprefix("text_model."))
        if theirs_key is None or base.shapes[theirs_key] != tuple(value.shape):
            return True
        theirs = base.read(theirs_key)
        common = _coarser(value.dtype, theirs.dtype)
        if not torch.equal(value.to(common), theirs.to(common)):
            return True
        seen += 1
    base.release()
    return seen < len(names)


def check_encoder_shapes(name: str, shapes: dict[str, tuple], base: Path, source: Path) -> None:
    """A teacher's own encoder must have the base's shapes: named key and both shapes otherwise."""
    want = {k: v for k, v in _meta_shapes(empty_encoder(base, name)).items() if not k.endswith("position_ids")}
    have = {model_key(k, want): v for k, v in shapes.items() if not k.endswith("position_ids")}
    problem = shape_mismatch(want, have)
    if problem is not None:
        raise TeacherFileError(f"{source.name}: its {name} does not have the base's shape: {problem}; use "
                               "text_encoder: base, or a teacher fine-tuned from this base")


def resolve_encoders(sources: dict[str, Callable[[], Iterator[tuple[str, torch.Tensor]]]],
                     shapes: dict[str, dict[str, tuple]], policy: str, base: Path, source: Path,
                     dtype: torch.dtype, config_folders: dict[str, Path] | None = None) -> dict[str, nn.Module]:
    """The teacher's own encoders the policy keeps. `sources[name]()` streams the encoder's tensors
    in diffusers naming (called once to compare with the base, once more to load)."""
    if policy == "base":
        return {}
    present = [n for n in base_encoders(base) if n in sources]
    if policy == "own":
        missing = [n for n in base_encoders(base) if n not in sources]
        if missing:
            raise TeacherFileError(_no_own_encoder(source, missing[0]))
    kept = {}
    for name in present:
        check_encoder_shapes(name, shapes[name], base, source)
        reference = _base_encoder_reader(base, name)
        if policy == "auto" and reference is not None and not _differs(sources[name](), reference):
            continue
        folder = (config_folders or {}).get(name)
        kept[name] = stream_into(empty_encoder(base, name, folder), sources[name](), dtype, source, name)
    return kept


# ----------------------------------------------------------------------------- diffusers folders
@dataclass(frozen=True)
class DiffusersOptions:
    subfolder: str = setting("", help="the UNet's folder inside the pipeline folder ('' finds unet/ or the root)")
    variant: str = setting("", help="weights variant to read, e.g. 'fp16' for diffusion_pytorch_model.fp16.*")


def check_unet_fits_base(shapes: dict[str, tuple], config: dict, base: Path, source: Path) -> None:
    """From the teacher's header and config alone (nothing read yet): same architecture and shapes
    as the base's UNet, or an error naming the architectures or the first differing key."""
    base_config = read_unet_config(unet_folder(base))
    mine, theirs = detect_arch(config), detect_arch(base_config)
    if mine.name != theirs.name:
        raise TeacherFileError(f"{source.name} is an {ARCH_TITLES[mine.name]} UNet but the recipe's base is "
                               f"{ARCH_TITLES[theirs.name]}; merge fine-tunes of the base only")
    with torch.device("meta"):
        want = _meta_shapes(UNet2DConditionModel.from_config(base_config))
    problem = shape_mismatch(want, shapes)
    if problem is not None:
        raise TeacherFileError(f"{source.name}: its UNet does not have the base's shape: {problem}; all "
                               "teachers must be fine-tunes of the same base architecture")


@register_format("diffusers", description="a diffusers pipeline folder (unet/, text_encoder/...) or a bare UNet "
                                          "folder", options=DiffusersOptions)
def _load_diffusers(path: Path, *, base: Path, allow_pickle: bool, options: DiffusersOptions,
                    dtype: torch.dtype = torch.float32, text_encoder: str = "auto") -> TeacherParts:
    folder = unet_folder(path, options.subfolder)
    config = read_unet_config(folder)
    files = weight_files(folder, options.variant)
    if not files:
        return TeacherParts(_load_pickled_folder(folder, options, allow_pickle), **_folder_encoders(
            path, folder, base, text_encoder, dtype, options.variant))
    reader = TensorReader(files)
    problem = config_mismatch(config, reader.shapes)
    if problem is not None:
        raise TeacherFileError(f"the weights in {folder} do not fit its config.json: {problem}; restore the "
                               "config.json that came with these weights")
    check_unet_fits_base(reader.shapes, config, base, path)
    unet = empty_model(lambda: UNet2DConditionModel.from_config(config))
    stream_into(unet, ((k, reader.read(k, dtype)) for k in reader), dtype, folder, "UNet")
    reader.release()
    return TeacherParts(unet, **_folder_encoders(path, folder, base, text_encoder, dtype, options.variant))


def _load_pickled_folder(folder: Path, options: DiffusersOptions, allow_pickle: bool) -> UNet2DConditionModel:
    if not allow_pickle:
        raise TeacherFileError(f"{folder} has no .safetensors weights; pickled weights load only with "
                               "allow_pickle: true")
    try:
        return UNet2DConditionModel.from_pretrained(folder, use_safetensors=False, local_files_only=True,
                                                    variant=options.variant or None)
    except (ValueError, RuntimeError, OSError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split()).split(". ")[0]
        raise TeacherFileError(f"the weights in {folder} do not fit its config.json ({reason}); "
                               "restore the config.json that came with these weights") from None


def _folder_encoders(path: Path, unet_dir: Path, base: Path, policy: str, dtype: torch.dtype,
                     variant: str) -> dict[str, nn.Module]:
    """A pipeline folder's own text_encoder/ (text_encoder_2/): streamed like the UNet."""
    root = unet_dir.parent if unet_dir != path else path
    readers = {}
    for name in base_encoders(base):
        files = weight_files(root / name, variant) if (root / name / "config.json").is_file() else []
        if files:
            readers[name] = TensorReader(files)
    sources = {n: (lambda r=r: ((k, r.read(k)) for k in r)) for n, r in readers.items()}
    return resolve_encoders(sources, {n: r.shapes for n, r in readers.items()}, policy, base, path, dtype,
                            {n: root / n for n in readers})


# ----------------------------------------------------------------------------- single files
@dataclass(frozen=True)
class SingleFileOptions:
    key_prefix: str = setting("", help="strip this prefix from every key (e.g. 'unet.'); LDM files are "
                                       "recognised without it")
    use_ema: bool = setting(False, help="original-layout files: load the EMA weights (model_ema.*) in place of "
                                        "the live ones")


def original_arch(keys: list[str]) -> str:
    """sd15 or sdxl for an original-layout (LDM/SGM) file, from its key names alone."""
    return "sdxl" if any(k.startswith(LDM_SDXL_MARKERS) for k in keys) else "sd15"


def ldm_unet_plan(keys: list[str], config: dict, use_ema: bool) -> dict[str, str]:
    """diffusers UNet key -> file key, learned by running diffusers' converter on the key names."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    names = {k: k for k in keys if k.startswith((LDM_UNET_PREFIX, LDM_EMA_PREFIX))}
    with _quiet():
        return convert_ldm_unet_checkpoint(names, config, extract_ema=use_ema)


def _unrecognised(source: Path, keys: list[str], base_keys: list[str]) -> TeacherFileError:
    found = sorted({k.split(".")[0] for k in keys})
    return TeacherFileError(
        f"{source.name}: cannot recognise the architecture of this file: expected the original SD/SDXL layout "
        f"(keys starting with {LDM_UNET_PREFIX!r}) or the base UNet's diffusers keys (e.g. {base_keys[0]!r}), "
        f"found keys starting with {found[:4]} (e.g. {sorted(keys)[:2]}); "
        "set options.key_prefix if the keys carry a prefix, or convert the file to one of these layouts")


def load_state(reader, source: Path, *, base: Path, dtype: torch.dtype, policy: str, use_ema: bool = False,
               key_prefix: str = "") -> TeacherParts:
    """A single state (file or pickled dict) in the original layout or the base UNet's diffusers layout."""
    keys = reader.keys()
    if key_prefix:
        rename = {k[len(key_prefix):]: k for k in keys if k.startswith(key_prefix)}
        if not rename:
            raise TeacherFileError(f"{source.name}: no key starts with options.key_prefix {key_prefix!r} "
                                   f"(keys look like {sorted(keys)[:2]})")
    else:
        rename = {k: k for k in keys}
    config = read_unet_config(unet_folder(base))
    base_arch = detect_arch(config).name
    unet = empty_model(lambda: UNet2DConditionModel.from_config(config))
    want = _meta_shapes(unet)
    if any(k.startswith(LDM_UNET_PREFIX) for k in rename):
        arch = original_arch(list(rename))
        if arch != base_arch:
            raise TeacherFileError(
                f"{source.name} is an {ARCH_TITLES[arch]} checkpoint (original layout: "
                f"{'keys conditioner.embedders.* / label_emb' if arch == 'sdxl' else 'no SDXL keys'}) but the "
                f"recipe's base is {ARCH_TITLES[base_arch]}; merge fine-tunes of the base only")
        if use_ema and not any(k.startswith(LDM_EMA_PREFIX) for k in rename):
            raise TeacherFileError(f"{source.name} has no EMA weights (no key starts with {LDM_EMA_PREFIX!r}); "
                                   "drop options.use_ema")
        try:
            learned = ldm_unet_plan(list(rename), config, use_ema)
        except KeyError as err:
            raise TeacherFileError(f"{source.name}: its UNet has no {err.args[0]!r}, which the base's {ARCH_TITLES[base_arch]} "
                                   "UNet needs; is it a fine-tune of this base?") from None
        plan = {d: rename[f] if f is not None else None for d, f in learned.items()}
        used = set(plan.values())
        stray = [k for k in rename if k.startswith(LDM_UNET_PREFIX) and rename[k] not in used]
        if stray and not use_ema:
            raise TeacherFileError(f"{source.name}: {len(stray)} UNet tensors have no place in the base's UNet "
                                   f"(e.g. {stray[0]}); is it a fine-tune of this base?")
        no_ema = [d for d, f in plan.items() if f is None]
        if no_ema:
            raise TeacherFileError(f"{source.name}: options.use_ema, but the file has no EMA copy of {no_ema[0]} "
                                   f"({len(no_ema)} missing); drop use_ema")
        encoders = LDM_TEXT_ENCODERS[arch]
    else:
        if not set(want) & set(rename):
            raise _unrecognised(source, keys, list(want))
        plan = {k: rename[k] for k in rename}
        missing = [k for k in want if k not in plan]
        unexpected = [k for k in plan if k not in want]
        if missing or unexpected:
            raise TeacherFileError(
                f"{source.name}: keys do not match the base UNet's layout (missing e.g. {missing[:2]}, "
                f"unexpected e.g. {unexpected[:2]}); set options.key_prefix if the keys carry a prefix")
        encoders = ()
    shapes = {d: reader.shapes[f] for d, f in plan.items()}
    for key, shape in want.items():  # from the header: nothing read yet
        if key in shapes and shapes[key] != shape:
            raise TeacherFileError(f"{source.name}: tensor {key} has shape {shapes[key]} but the base UNet's "
                                   f"config wants {shape}; is it a fine-tune of this base?")
    problem = shape_mismatch(want, shapes)
    if problem is not None:
        raise TeacherFileError(f"{source.name}: its UNet does not fit the base's: {problem}; is it a fine-tune of "
                               "this base?")
    stream_into(unet, ((d, reader.read(f, dtype)) for d, f in plan.items()), dtype, source, "UNet")
    reader.release()
    own = _original_encoders(reader, rename, encoders, base, source, policy, dtype)
    return TeacherParts(unet, **own)


_LAYER = re.compile(r"\.(?:layers|resblocks)\.(\d+)\.")


def _original_encoders(reader, rename: dict[str, str], encoders, base: Path, source: Path, policy: str,
                       dtype: torch.dtype) -> dict[str, nn.Module]:
    """An original-layout file's text encoders, converted by diffusers one layer at a time."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    sources, shapes = {}, {}
    for name, prefix, kind in encoders:
        keys = [k for k in rename if k.startswith(prefix)]
        if not keys or name not in base_encoders(base):
            continue
        model = empty_encoder(base, name)
        flat = not hasattr(model, "text_model")  # transformers 5 flattened CLIPTextModel
        groups: dict[str, list[str]] = {}
        for key in keys:
            match = _LAYER.search(key)
            groups.setdefault(match.group(1) if match else "", []).append(key)

        def convert(group: dict, prefix=prefix, kind=kind, model=model, flat=flat) -> dict:
            with _quiet():
                out = (convert_ldm_clip_checkpoint(group, prefix) if kind == "clip"
                       else convert_open_clip_checkpoint(model, group, prefix=prefix))
            return {k.removeprefix("text_model.") if flat else k: v for k, v in out.items()}

        def stream(groups=groups, convert=convert):
            for group in groups.values():
                yield from convert({k: reader.read(rename[k]) for k in group}).items()

        sources[name] = stream
        shapes[name] = {k: tuple(v.shape) for k, v in convert(
            {k: torch.empty(reader.shapes[rename[k]], device="meta") for k in keys}).items()}
    return resolve_encoders(sources, shapes, policy, base, source, dtype)


@register_format("single_file", description="one .safetensors file in diffusers or original (LDM/SGM) key layout; "
                                            "its own text encoders when it has them", options=SingleFileOptions)
def _load_single_file(path: Path, *, base: Path, allow_pickle: bool, options: SingleFileOptions,
                      dtype: torch.dtype = torch.float32, text_encoder: str = "auto") -> TeacherParts:
    if path.suffix != ".safetensors":
        raise TeacherFileError(f"{path}: single_file teachers are .safetensors; use format: ckpt for pickled files")
    return load_state(TensorReader([path], full_paths=False), path, base=base, dtype=dtype, policy=text_encoder,
                      use_ema=options.use_ema, key_prefix=options.key_prefix)


@dataclass(frozen=True)
class CkptOptions:
    state_key: str = setting("state_dict", help="the entry that holds the weights when the file nests them")
    key_prefix: str = setting("", help="strip this prefix from every key (e.g. 'unet.')")
    use_ema: bool = setting(False, help="original-layout files: load the EMA weights (model_ema.*) in place of "
                                        "the live ones")


@register_format("ckpt", description="a pickled torch checkpoint, diffusers or original layout (needs allow_pickle)",
                 options=CkptOptions)
def _load_ckpt(path: Path, *, base: Path, allow_pickle: bool, options: CkptOptions,
               dtype: torch.dtype = torch.float32, text_encoder: str = "auto") -> TeacherParts:
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
    return load_state(DictReader(state), path, base=base, dtype=dtype, policy=text_encoder,
                      use_ema=options.use_ema, key_prefix=options.key_prefix)


__all__ = ["LDM_UNET_PREFIX", "TEACHER_FORMATS", "TeacherFileError", "TeacherParts", "TensorReader", "detect_format",
           "list_formats", "load_teacher_parts", "load_teacher_unet", "read_safetensors", "read_unet_config",
           "register_format", "unet_folder"]
