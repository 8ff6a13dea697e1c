"""A style LoRA: the baked UNet minus the base UNet, per layer truncated to a rank by SVD.

Written in kohya's layout, which A1111, ComfyUI and diffusers' `load_lora_weights` all read:
`lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` (alpha = rank, so the
scale is 1). Module names follow kohya's own trainer (`Arch.lora_names`): diffusers names for
SD1.x-family UNets, original SGM names for SDXL-structured ones; a UNet whose block structure
has no SGM counterpart (the toy UNets) keeps diffusers names, which diffusers reads all the same.
Every Linear and Conv2d weight that changed is covered (convolutions as their (out, in*kh*kw)
matrix). Biases, norms and embeddings are not LoRA-shaped: they are left out, and how much
of the difference they hold is reported, as is the error the truncation leaves per layer and
on one probe input of the whole UNet.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dmm.export.ldm_keys import key_map
from dmm.io import atomic_save_safetensors, atomic_write_json
from dmm.models.arch import LORA_FULL_RANK_LAYERS, detect_arch

UNET_PREFIX = "model.diffusion_model."
# Kohya's diffusers naming comes from SD1.x, which has no added-conditioning MLP; diffusers'
# reader mangles `lora_unet_add_embedding_linear_1` (it drops the trailing index), so these
# layers stay out of a diffusers-named LoRA and count as not carried.
_NO_DIFFUSERS_NAME = ("add_embedding.",)


def lora_layers(unet) -> dict[str, nn.Module]:
    """The Linear and Conv2d modules a LoRA can cover, by diffusers module path."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def max_rank(module: nn.Module) -> int:
    w = module.weight
    return min(w.shape[0], math.prod(w.shape[1:]))


def layer_ranks(unet, rank: int, covered=None) -> dict[str, int]:
    """The rank each layer gets; refuses a rank some layer cannot hold (naming it). The latent
    channels bound `LORA_FULL_RANK_LAYERS`, which are stored exactly at their full rank instead."""
    if rank < 1:
        raise ValueError(f"--rank must be at least 1, got {rank}")
    ranks, too_small = {}, []
    for name, module in lora_layers(unet).items():
        if covered is not None and name not in covered:
            continue
        full = max_rank(module)
        if name in LORA_FULL_RANK_LAYERS:
            ranks[name] = min(rank, full)
        elif rank > full:
            too_small.append((full, name))
        else:
            ranks[name] = rank
    if too_small:
        full, name = min(too_small)
        raise ValueError(f"--rank {rank} is larger than layer {name} allows (its weight has rank at most {full}; "
                         f"{len(too_small)} layers are that small): choose --rank {full} or less")
    return ranks


def kohya_names(unet) -> tuple[str, dict[str, str]]:
    """(layout, diffusers module path -> kohya module name)."""
    arch = detect_arch(unet.config)
    layers = list(lora_layers(unet))
    if arch.lora_names == "sgm":
        try:
            places = key_map(arch, "diffuser", unet)
        except (KeyError, IndexError, ValueError):
            places = {}
        sources = {name: places.get(f"{name}.weight") for name in layers}
        if all(src is not None for src in sources.values()):
            return "sgm", {name: src.key.removeprefix(UNET_PREFIX).removesuffix(".weight").replace(".", "_")
                           for name, src in sources.items()}
    return "diffusers", {name: name.replace(".", "_") for name in layers if not name.startswith(_NO_DIFFUSERS_NAME)}


def probe_inputs(unet, seed: int = 0) -> dict:
    """One fixed UNet input (latent, timestep, text states, SDXL's pooled text and size ids)."""
    cfg = unet.config
    arch = detect_arch(cfg)
    g = torch.Generator().manual_seed(seed)
    size = 2 ** len(cfg.block_out_channels)
    dev, dtype = unet.device, unet.dtype
    kwargs = {"sample": torch.randn(1, cfg.in_channels, size, size, generator=g),
              "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 8, cfg.cross_attention_dim, generator=g)}
    if arch.uses_text_time:
        pooled = cfg.projection_class_embeddings_input_dim - arch.time_ids * cfg.addition_time_embed_dim
        pixels = float(size * 8)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]])}
    return _to(kwargs, dev, dtype)


def _to(value, device, dtype):
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


@torch.no_grad()
def _probe(unet, inputs) -> torch.Tensor:
    return unet(**inputs).sample.float()


def _relative(diff: torch.Tensor, ref: torch.Tensor) -> float:
    ref_norm = float(ref.norm())
    return float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm() > 0)


@torch.no_grad()
def extract_lora(base, tuned, rank: int, dtype: torch.dtype = torch.float16) -> tuple[dict, dict]:
    """(kohya tensors, report). `base` is modified in place into base + LoRA (to measure the
    whole UNet's error), so pass a copy you do not need afterwards."""
    layout, names = kohya_names(base)
    ranks = layer_ranks(base, rank, names)
    tuned_layers = lora_layers(tuned)
    inputs = probe_inputs(base)
    out_base, out_tuned = _probe(base, inputs), _probe(tuned, inputs)
    tensors, errors, full_rank, carried_sq = {}, {}, [], 0.0
    covered = {name: m for name, m in lora_layers(base).items() if name in names}
    for name, module in covered.items():
        w_base, w_tuned = module.weight, tuned_layers[name].weight
        delta = (w_tuned.float() - w_base.float()).reshape(w_base.shape[0], -1)
        if not torch.any(delta):
            continue
        carried_sq += float(delta.norm()) ** 2
        r = ranks[name]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        up, down = (u[:, :r] * s[:r]).to(dtype).contiguous(), vh[:r].to(dtype).contiguous()
        approx = up.float() @ down.float()
        errors[name] = _relative(delta - approx, delta)
        if r < rank:
            full_rank.append(name)
        conv = w_base.ndim == 4
        key = f"lora_unet_{names[name]}"
        tensors[f"{key}.lora_down.weight"] = down.reshape(r, *w_base.shape[1:]) if conv else down
        tensors[f"{key}.lora_up.weight"] = up.reshape(*up.shape, 1, 1) if conv else up
        tensors[f"{key}.alpha"] = torch.tensor(float(r), dtype=dtype)
        w_base.add_(approx.reshape(w_base.shape).to(w_base.dtype))
    if not tensors:
        raise ValueError("the baked UNet's Linear/Conv weights equal the base's: there is no style difference a LoRA "
                         "could hold (is --base the model the merged one was trained from?)")
    out_lora = _probe(base, inputs)
    carried = {f"{n}.weight" for n in covered}
    base_params = dict(base.named_parameters())
    left = {k: p.float() - base_params[k].float() for k, p in tuned.named_parameters() if k not in carried}
    left_norm = math.sqrt(sum(float(d.norm()) ** 2 for d in left.values()))
    all_norm = math.sqrt(left_norm ** 2 + carried_sq)
    worst = max(errors, key=errors.get)
    report = {
        "rank": rank, "layout": layout, "dtype": str(dtype).removeprefix("torch."), "layers": len(errors),
        "layer_error": {"max": errors[worst], "mean": sum(errors.values()) / len(errors), "worst_layer": worst},
        "full_rank_layers": full_rank,
        "probe_error": {
            "relative_to_output": _relative(out_lora - out_tuned, out_tuned),
            "relative_to_style_change": _relative(out_lora - out_tuned, out_tuned - out_base),
        },
        "not_carried": {"tensors": sum(bool(torch.any(d)) for d in left.values()),
                        "share_of_difference": left_norm / all_norm if all_norm > 0 else 0.0,
                        "what": "biases, norms, embeddings (no LoRA shape) and layers the layout cannot name; "
                                "the probe error includes them"},
        "per_layer_error": {names[n]: e for n, e in errors.items()},
    }
    return tensors, report


def report_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".json")


def write_lora(tensors: dict, report: dict, out: str | Path, metadata: dict | None = None) -> Path:
    """The LoRA and its report next to it (`NAME.json`), each written atomically."""
    out = Path(out)
    info = {"ss_network_module": "networks.lora", "ss_network_dim": report["rank"],
            "ss_network_alpha": report["rank"], **(metadata or {})}
    atomic_save_safetensors(tensors, out, metadata={k: str(v) for k, v in info.items()})
    atomic_write_json(report_path(out), report)
    return out


def summary(report: dict) -> str:
    """The report in three lines for the command line."""
    layer, probe, left = report["layer_error"], report["probe_error"], report["not_carried"]
    return (f"rank {report['rank']} ({report['layout']} names), {report['layers']} layers: relative Frobenius error "
            f"max {layer['max']:.3g} ({layer['worst_layer']}), mean {layer['mean']:.3g}\n"
            f"UNet output on a probe input: error {probe['relative_to_output']:.3g} of the output, "
            f"{probe['relative_to_style_change']:.3g} of the style's change\n"
            f"not carried: {left['tensors']} bias/norm/embedding tensors or unnamed layers "
            f"({left['share_of_difference']:.3g} of the weight difference)"
            + (f"\nnote: {report['note']}" if "note" in report else ""))
