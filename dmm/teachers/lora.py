"""LoRA teachers: a base pipeline with one LoRA file fused at a scale (the paper's SD1.5-LoRA setting).

The teacher is `W + scale * (alpha / rank) * up @ down` for every module the file names, built
with diffusers' and peft's own LoRA code: diffusers reads the file and converts kohya
(`lora_unet_*`, `lora_te*_*`, `.alpha`), diffusers (`unet.*.lora.down.weight`,
`*.lora_linear_layer.*`) and peft (`unet.*.lora_A.weight`, alpha in the file's metadata) layouts,
peft injects the adapters, and the pipeline's `fuse_lora` / `unload_lora_weights` bake them in.
No key table lives here.

diffusers only warns (or says nothing) when a module of the file is absent from the base; here
every module the file names must have been adapted, else `TeacherFileError` names the unmatched
ones, and a module whose shape differs from the base's is refused before anything is loaded.

Text-encoder parts of the file give the teacher its own text encoder(s), returned in
`TeacherParts`; a file with UNet parts only leaves the teacher on the base's encoders.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dmm.io import replace_dir
from dmm.schema import setting
from dmm.teachers.formats import TeacherFileError, TeacherParts, _quiet, register_format, unet_folder

ADAPTER = "dmm_teacher"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
SHOWN = 4  # module names quoted in an error


@dataclass(frozen=True)
class LoraOptions:
    scale: float = setting(1.0, help="LoRA strength fused into the base (the usual 'LoRA weight')")
    base: str = setting("", help="pipeline folder the LoRA was trained on; '' is the recipe's model.base "
                                 "(the recipe's teachers[].base sets it)")


def _pipeline_class(base: Path):
    """The base's pipeline class (model_index.json), which owns diffusers' LoRA loading for that family."""
    import diffusers

    index = base / "model_index.json"
    if not index.is_file():
        raise TeacherFileError(f"the LoRA base {base} is not a diffusers pipeline folder (no model_index.json); "
                               "point the teacher's base (or model.base) at the pipeline the LoRA was trained on")
    name = json.loads(index.read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "load_lora_into_unet"):
        raise TeacherFileError(f"the LoRA base {base} is a {name or 'unknown'} pipeline, which has no LoRA loader "
                               "in diffusers; LoRA teachers need an SD1.5- or SDXL-style pipeline")
    return cls, json.loads(index.read_text())


def _component(key: str) -> str:
    return key.split(".", 1)[0]


def read_lora(file: Path, pipeline_cls, unet_config: dict) -> tuple[dict, dict | None, dict | None]:
    """(state dict with component prefixes, kohya network alphas, peft metadata), through diffusers."""
    if file.suffix != ".safetensors":
        raise TeacherFileError(f"{file}: LoRA teachers are .safetensors files (convert pickled LoRAs first)")
    from safetensors import SafetensorError, safe_open

    try:
        with _quiet():
            state, alphas, metadata = pipeline_cls.lora_state_dict(
                str(file), unet_config=unet_config, use_safetensors=True, local_files_only=True,
                return_lora_metadata=True)
    except (SafetensorError, OSError) as err:
        raise TeacherFileError(f"{file.name} is not a readable safetensors file ({err}); re-download it") from None
    except ValueError as err:  # e.g. kohya keys diffusers cannot rename
        raise TeacherFileError(f"{file.name}: diffusers cannot read this LoRA ({' '.join(str(err).split())})") \
            from None
    if not state:
        raise TeacherFileError(f"{file.name} holds no tensors")
    with safe_open(str(file), "pt") as handle:  # diffusers drops kohya DoRA scales with a warning only
        dora = [k for k in handle.keys() if k.endswith(".dora_scale")]  # noqa: SIM118 - not iterable
    if dora:
        raise TeacherFileError(f"{file.name} is a DoRA ({len(dora)} dora_scale tensors, e.g. {dora[0]}); diffusers "
                               "would load it as a plain LoRA, which is another model: convert it to a LoRA first")
    stray = sorted({_component(k) for k in state if _component(k) not in ("unet", *TEXT_ENCODERS)})
    if stray:
        raise TeacherFileError(
            f"{file.name}: keys under {stray} belong to no part of an SD pipeline (unet, text_encoder, "
            "text_encoder_2); expected kohya (lora_unet_*), diffusers or peft LoRA keys prefixed with unet. / "
            "text_encoder.")
    return state, alphas, metadata


def _part(state: dict, prefix: str) -> dict:
    return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}


def _unet_part(state: dict) -> dict:
    """The UNet's keys in peft naming, converted the way diffusers' `load_lora_adapter` does."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    part = _part(state, "unet")
    if part and "lora_A" not in next(iter(part)):
        part = convert_unet_state_dict_to_peft(part)
    return part


def _text_encoder_part(state: dict, prefix: str, text_encoder) -> dict:
    """A text encoder's keys in peft naming, converted the way diffusers does for text encoders."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
    )

    part = _part(state, prefix)
    if not part:
        return part
    # diffusers infers the old `to_q_lora.down` layout (what kohya files convert to) only when an
    # out_proj key is present; say it, so LoRAs without out_proj read too.
    old = any("_lora.down." in k or "_lora.up." in k for k in part)
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
        part, StateDictType.DIFFUSERS_OLD if old else None))
    if not hasattr(text_encoder, "text_model"):  # transformers 5 flattened CLIPTextModel
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    return part


def lora_modules(part: dict) -> dict[str, tuple[tuple, tuple]]:
    """Module name -> (down shape, up shape) of a peft-named LoRA state dict."""
    out: dict[str, list] = {}
    for key, value in part.items():
        for tag, slot in ((".lora_A.", 0), (".lora_B.", 1)):
            if tag in key and key.endswith(".weight"):
                out.setdefault(key.split(tag)[0], [(), ()])[slot] = tuple(value.shape)
    return {k: (v[0], v[1]) for k, v in out.items()}


def _names(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_fits(model, modules: dict[str, tuple[tuple, tuple]], what: str, source: Path) -> None:
    """Every LoRA module exists in `model` and its down/up shapes fit the module's weight."""
    own = dict(model.named_modules())
    missing = [m for m in modules if m not in own or not hasattr(own[m], "weight")]
    if missing:
        raise TeacherFileError(
            f"{source.name}: {len(missing)} of {len(modules)} LoRA modules are not in the base's {what}: "
            f"{_names(missing)}; is this LoRA for another base model (SD1.5 vs SDXL)? Point the teacher's base "
            "at the model it was trained on")
    bad = []
    for name, (down, up) in modules.items():
        weight = own[name].weight.shape
        if len(down) < 2 or len(up) < 2 or down[1] != weight[1] or up[0] != weight[0]:
            bad.append(f"{name} (LoRA {down[1:2] + up[0:1]} in/out, base {tuple(weight[1:2]) + tuple(weight[0:1])})")
    if bad:
        raise TeacherFileError(f"{source.name}: {len(bad)} LoRA modules do not fit the base's {what} shapes: "
                               f"{_names(bad)}; this LoRA was trained on another base model")


def check_keys(part: dict, what: str, source: Path) -> None:
    """Every key of a component's part is a LoRA down or up weight once converted to peft naming."""
    odd = [k for k in part if not (".lora_A." in k or ".lora_B." in k)]
    if odd:
        raise TeacherFileError(f"{source.name}: {len(odd)} {what} keys are not LoRA weights diffusers can convert: "
                               f"{_names(odd)}; only LoRA (not LoHa/LoKr/DoRA) files make teachers")


def adapted_modules(model) -> dict:
    """Modules of `model` that hold this teacher's adapter (after loading, before fusing), by name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and ADAPTER in getattr(m, "lora_A", {})}


def check_loaded(model, part: dict, what: str, source: Path) -> None:
    """Every module of the file holds exactly the file's down and up weights (diffusers only warns
    about keys it could not place, and says nothing about a target peft matched elsewhere)."""
    layers = adapted_modules(model)
    wrong = []
    for name in lora_modules(part):
        layer = layers.get(name)
        if layer is None or not all(
                torch.equal(getattr(layer, ab)[ADAPTER].weight,
                            part[f"{name}.{ab}.weight"].to(getattr(layer, ab)[ADAPTER].weight.dtype))
                for ab in ("lora_A", "lora_B")):
            wrong.append(name)
    if wrong:
        raise TeacherFileError(f"{source.name}: {len(wrong)} of {len(lora_modules(part))} LoRA modules were not "
                               f"applied to the base's {what}: {_names(wrong)}; the LoRA does not match this base")


def _inject_text_encoder(text_encoder, part: dict, state_prefix: str, alphas: dict | None, metadata: dict | None):
    """peft's injection of a text encoder's adapter, configured like diffusers' text-encoder loader.

    diffusers goes through transformers' `load_adapter`, which transformers 5.24 refuses for every
    peft release installable here (it asks for peft >= 0.22); peft's own injection is what that
    path runs underneath, and it is the same call diffusers makes for the UNet."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    meta = _part(metadata, state_prefix) if metadata else None
    if meta:
        config = LoraConfig(**meta)
    else:
        rank = {k: v.shape[1] for k, v in part.items() if "lora_B" in k and v.ndim > 1}
        alpha = {k.removeprefix(f"{state_prefix}."): v for k, v in (alphas or {}).items()
                 if k.split(".")[0] == state_prefix}
        config = LoraConfig(**get_peft_kwargs(rank, alpha, part, is_unet=False))
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER)
    set_peft_model_state_dict(text_encoder, part, adapter_name=ADAPTER)


def fuse_lora_teacher(file: str | Path, base: str | Path, scale: float = 1.0, text_encoder: str = "auto") \
        -> TeacherParts:
    """The base pipeline's UNet (and text encoders the LoRA touches) with `file` fused at `scale`.

    `text_encoder` (the recipe's policy): `auto` gives the teacher its own encoder for each one the
    file adapts, `own` requires the file to adapt one, `base` leaves the encoders out (not loaded)."""
    file, base = Path(file), Path(base)
    if not file.is_file():
        raise FileNotFoundError(f"LoRA file does not exist: {file}")
    if not base.exists():
        raise FileNotFoundError(f"LoRA base does not exist: {base}")
    cls, index = _pipeline_class(base)
    unet_cfg = json.loads((unet_folder(base) / "config.json").read_text())
    state, alphas, metadata = read_lora(file, cls, unet_cfg)
    unet_part = _unet_part(state)
    wanted = {p for p in TEXT_ENCODERS if p in index and _part(state, p)}
    missing = sorted({_component(k) for k in state} - {"unet", *wanted})
    if missing:
        raise TeacherFileError(f"{file.name} has {missing} parts but the base {base} has no such component; "
                               "is this LoRA for another base model (SD1.5 has one text encoder, SDXL two)?")
    if text_encoder == "own" and not wanted:
        raise TeacherFileError(f"text_encoder: own, but {file.name} adapts no text encoder (UNet LoRA only); use "
                               "text_encoder: auto or base")
    if text_encoder == "base":
        wanted = set()
    # Components the LoRA does not touch are not loaded (None skips them in from_pretrained).
    skip = {k: None for k in index if not k.startswith("_") and k not in ("unet", "scheduler", *wanted)
            and not k.startswith("tokenizer")}
    pipe = cls.from_pretrained(str(base), dtype=torch.float32, local_files_only=True, **skip)
    modules = {"unet": lora_modules(unet_part)}
    parts = {}
    for prefix in sorted(wanted):
        parts[prefix] = _text_encoder_part(state, prefix, getattr(pipe, prefix))
        modules[prefix] = lora_modules(parts[prefix])
    parts["unet"] = unet_part
    for what, part in parts.items():
        check_keys(part, what, file)
        check_fits(getattr(pipe, what), modules[what], what, file)
    with _quiet():
        if unet_part:
            cls.load_lora_into_unet(state, network_alphas=alphas, unet=pipe.unet, adapter_name=ADAPTER,
                                    metadata=metadata, _pipeline=pipe)
        for prefix in wanted:
            _inject_text_encoder(getattr(pipe, prefix), parts[prefix], prefix, alphas, metadata)
        for what, part in parts.items():
            check_loaded(getattr(pipe, what), part, what, file)
        fused = [w for w, mods in modules.items() if mods]
        if not fused:
            raise TeacherFileError(f"{file.name} adapts only text encoders and text_encoder: base leaves them out: "
                                   "this teacher would be the base itself; use text_encoder: auto")
        pipe.fuse_lora(components=fused, lora_scale=float(scale), adapter_names=[ADAPTER])
        pipe.unload_lora_weights()
    return TeacherParts(unet=pipe.unet, **{p: getattr(pipe, p) for p in wanted})


def lora_teacher_folder(file: str | Path, base: str | Path, scale: float, cache: str | Path) -> Path:
    """The fused teacher as a pipeline folder under `cache` (the base's folder with the fused UNet and
    the LoRA's own encoders), for samplers that load teachers from folders. Named by the LoRA file's
    content, the base and the scale, so it is written once and then reused as is."""
    file, base = Path(file), Path(base).resolve()
    digest = hashlib.sha256(file.read_bytes())
    digest.update(f"|{base}|{float(scale)!r}".encode())
    folder = Path(cache) / f"lora-{file.stem}-{digest.hexdigest()[:16]}"
    if (folder / "model_index.json").is_file():
        return folder
    parts = fuse_lora_teacher(file, base, scale)
    cls, _ = _pipeline_class(base)
    pipe = cls.from_pretrained(str(base), dtype=torch.float32, local_files_only=True, unet=parts.unet,
                               **parts.encoders())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        pipe.save_pretrained(str(tmp))
        replace_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def teacher_folder(spec, model_base: str | Path, cache: str | Path) -> Path:
    """A recipe teacher as a pipeline folder to sample: its own path, or a LoRA teacher fused once."""
    if spec.format != "lora":
        return Path(spec.path)
    options = LoraOptions(**{k: v for k, v in spec.options.items() if k in ("scale", "base")})
    return lora_teacher_folder(spec.path, options.base or model_base, options.scale, cache)


@register_format("lora", description="a LoRA file (kohya, diffusers or peft layout) fused into a base at a scale",
                 options=LoraOptions)
def _load_lora(path: Path, *, base: Path, allow_pickle: bool, options: LoraOptions,
               text_encoder: str = "auto") -> TeacherParts:
    return fuse_lora_teacher(path, Path(options.base) if options.base else base, options.scale, text_encoder)


__all__ = ["LoraOptions", "adapted_modules", "check_fits", "check_keys", "check_loaded", "fuse_lora_teacher",
           "lora_modules", "lora_teacher_folder", "read_lora", "teacher_folder"]
