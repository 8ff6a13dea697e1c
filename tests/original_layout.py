"""Original-layout (LDM/SGM) single files from diffusers models of any size, for tests.

diffusers' package converts only original -> diffusers. `dmm.export.ldm_keys` inverts it on
sd-mecha's full-size key lists; tiny test models have no such list, so here a candidate original
key is proposed for every diffusers key from the block arithmetic diffusers' converter uses, and
diffusers' converter is then run forward on the candidates: a candidate set that does not convert
back to exactly the diffusers keys (and, for OpenCLIP, values) is an error, so the inverse is
checked against diffusers every time it is used. `test_teacher_formats` also checks it yields
sd-mecha's real key names at full size.
"""

from __future__ import annotations

import re

import torch
from diffusers.loaders import single_file_utils as sfu

from dmm.teachers.formats import LDM_EMA_PREFIX, LDM_TEXT_ENCODERS, LDM_UNET_PREFIX

# ResBlock sub-module names: diffusers' converter renames the original's to these.
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.*)$")


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        rest = rest.replace(new, old)
    return rest


def _candidate(key: str, config: dict, top: dict[str, str]) -> str:
    per = config["layers_per_block"] + 1
    if key in top:
        return top[key]
    match = _BLOCK.match(key)
    if match:
        side, b, kind, i, rest = match.groups()
        b, i = int(b), int(i)
        if side == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{1 + b * per + per - 1}.0.op.{rest.removeprefix('conv.')}"
            slot = 0 if kind == "resnets" else 1
            return f"input_blocks.{1 + b * per + i}.{slot}.{_resnet(rest) if slot == 0 else rest}"
        if kind == "upsamplers":
            has_attention = config["up_block_types"][b].startswith("CrossAttn")
            return f"output_blocks.{b * per + per - 1}.{2 if has_attention else 1}.{rest}"
        slot = 0 if kind == "resnets" else 1
        return f"output_blocks.{b * per + i}.{slot}.{_resnet(rest) if slot == 0 else rest}"
    match = _MID.match(key)
    if match:
        kind, i, rest = match.groups()
        return f"middle_block.{2 * int(i)}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    raise ValueError(f"no original-layout place known for UNet key {key}")


def unet_key_map(keys, config: dict) -> dict[str, str]:
    """diffusers UNet key -> original key (without `model.diffusion_model.`), checked by diffusers."""
    mapping = sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]
    top = dict(mapping["layers"])
    if config.get("addition_embed_type") == "text_time":
        top.update(mapping["addition_embed_type"])
    proposed = {k: _candidate(k, config, top) for k in keys}
    forward = sfu.convert_ldm_unet_checkpoint({LDM_UNET_PREFIX + v: v for v in proposed.values()}, dict(config))
    back = {v: k for k, v in forward.items()}
    wrong = [k for k, v in proposed.items() if back.get(v) != k]
    if wrong or len(forward) != len(proposed):
        raise AssertionError(f"diffusers does not convert the proposed original keys back, e.g. {wrong[:3]}")
    return proposed


def unet_to_original(state: dict[str, torch.Tensor], config: dict, ema: dict | None = None) -> dict[str, torch.Tensor]:
    """`ema`: the EMA weights (diffusers keys), stored as the original trainer does: the module
    path without dots under `model_ema.`."""
    mapping = unet_key_map(list(state), config)
    out = {LDM_UNET_PREFIX + v: state[k] for k, v in mapping.items()}
    if ema is not None:
        out.update({LDM_EMA_PREFIX + "diffusion_model" + v.replace(".", ""): ema[k] for k, v in mapping.items()})
        out[LDM_EMA_PREFIX + "decay"] = torch.tensor(0.9999)
        out[LDM_EMA_PREFIX + "num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return out


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A HF CLIP text model in the original layout: the transformers module under `prefix`."""
    out = {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}
    out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(
        state[next(k for k in state if k.endswith("position_embedding.weight"))].shape[0])[None]
    back = sfu.convert_ldm_clip_checkpoint(out, prefix)
    assert {k.removeprefix("text_model.") for k in back} - {"embeddings.position_ids"} == \
        {k.removeprefix("text_model.") for k in state}
    return out


def open_clip_to_original(model, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP's layout (SDXL's second encoder), checked by diffusers."""
    state = model.state_dict()
    layers = {d: o for d, o in sfu.DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items()}
    renames = list(sfu.DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"].items())
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in layers:
            out[prefix + layers[key]] = value.T.contiguous() if layers[key] == "text_projection" else value
            continue
        name = key
        for new, old in reversed(renames):
            name = name.replace(new, old)
        match = re.match(r"^(.*\.attn)\.([qkv])_proj\.(weight|bias)$", name)
        if match:
            packed.setdefault(f"{prefix}transformer.{match.group(1)}.in_proj_{match.group(3)}", {})[
                match.group(2)] = value
        else:
            out[f"{prefix}transformer.{name}"] = value
    for key, parts in packed.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    back = sfu.convert_open_clip_checkpoint(model, out, prefix=prefix)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    return out


def pipeline_to_original(pipe, arch: str, *, text_encoders: bool = True, vae: bool = True, ema: dict | None = None,
                         unet_state: dict | None = None) -> dict[str, torch.Tensor]:
    """One original-layout state dict of a diffusers pipeline (UNet, optionally text encoders, VAE, EMA).
    The VAE keeps its diffusers names under `first_stage_model.`: loaders only have to skip it."""
    out = unet_to_original(unet_state or pipe.unet.state_dict(), dict(pipe.unet.config), ema=ema)
    if text_encoders:
        for name, prefix, kind in LDM_TEXT_ENCODERS[arch]:
            module = getattr(pipe, name)
            out.update(clip_to_original(module.state_dict(), prefix) if kind == "clip"
                       else open_clip_to_original(module, prefix))
    if vae:
        out.update({f"first_stage_model.{k}": v for k, v in pipe.vae.state_dict().items()})
    return {k: v.contiguous() for k, v in out.items()}
