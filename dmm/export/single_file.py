"""One `.safetensors` in the original (LDM/SGM) layout, the file A1111 and ComfyUI load.

Every pipeline component goes through `dmm.export.ldm_keys` (diffusers' own converters,
inverted) and is checked against sd-mecha's model config of the architecture, shape by shape,
before anything is written: a file that A1111/ComfyUI would misread is never produced.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dmm.export.ldm_keys import original_keys, to_original
from dmm.io import atomic_save_safetensors
from dmm.models.arch import Arch, full_size_arch

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def single_file_state(pipe, arch: Arch, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Every component of `pipe` in `arch`'s original layout, plus the markers its readers look for
    (`v_pred` for v-prediction, `ztsnr` for zero-terminal-SNR schedules, where the layout has them)."""
    state: dict[str, torch.Tensor] = {}
    for name, component in arch.single_file_components:
        model = getattr(pipe, name, None)
        if model is None:
            raise ValueError(f"the pipeline has no {name}: a {arch.single_file_config} single file needs all of "
                             f"{', '.join(n for n, _ in arch.single_file_components)}")
        for key, value in to_original(arch, component, model).items():
            state[key] = value.to(dtype) if value.is_floating_point() else value
    layout = {k for _, component in arch.single_file_components for k in original_keys(arch, component)}
    scheduler = getattr(pipe, "scheduler", None)
    config = scheduler.config if scheduler is not None else {}
    markers = {"v_pred": config.get("prediction_type") == "v_prediction",
               "ztsnr": bool(config.get("rescale_betas_zero_snr", False))}
    for marker, wanted in markers.items():
        if wanted and marker in layout:
            state[marker] = torch.zeros(0, dtype=torch.int64)
    return state


def check_layout(state: dict[str, torch.Tensor], arch: Arch) -> None:
    """Every required original key present with the architecture's shape, and nothing foreign."""
    expected = {}
    for _, component in arch.single_file_components:
        expected.update(original_keys(arch, component))
    missing = [k for k, meta in expected.items() if not meta.optional and k not in state]
    foreign = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in state.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    for problem, keys in (("missing", missing), ("not in the layout", foreign), ("of the wrong shape", wrong)):
        if keys:
            raise ValueError(f"{len(keys)} tensors {problem} for {arch.single_file_config} (e.g. {keys[:3]}): the "
                             f"pipeline's components are not the full-size {arch.name} ones; export with --format "
                             "diffusers")


def export_single_file(pipe, out: str | Path, dtype: str = "fp16", metadata: dict | None = None) -> Path:
    """Write `pipe` (a stock SD1.5/SDXL pipeline, e.g. with a baked UNet) as one original-layout
    file; written under a temporary name, so an existing `out` survives any failure."""
    out = Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    arch = full_size_arch(pipe.unet.config)  # toy UNets are refused here: no A1111/ComfyUI config fits them
    state = single_file_state(pipe, arch, DTYPES[dtype])
    check_layout(state, arch)
    info = {"format": "pt", "dmm.layout": arch.single_file_config, **(metadata or {})}
    atomic_save_safetensors(state, out, metadata={k: str(v) for k, v in info.items()})
    return out
