"""`dmm export --format single-file`: one original-layout `.safetensors` that diffusers'
`from_single_file` (with a local config folder) loads back to the same weights and outputs and
that sd-mecha recognises as `sd1-ldm` / `sdxl-sgm` (the layouts A1111 and ComfyUI read).

Narrow pipelines with the real block structure (every original key exists, only widths differ)
test the mapping of UNet, VAE and both text encoders quickly; two slow tests write full-size
random SD1.5 and SDXL models (under the memory lock when run by hand)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from dmm.cli import main
from dmm.export.lora import probe_inputs
from dmm.export.single_file import check_layout, single_file_state
from dmm.io import atomic_save_safetensors
from dmm.models.arch import get_arch
from dmm.pipeline import load_plain_unet
from dmm.testing import make_layout_pipeline
from dmm.train.export import build_student, export_merged

PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
COMPONENTS = {"sd15": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


def mecha_config(path) -> str:
    """The model config sd-mecha identifies a file as (what its merge tools then use)."""
    import sd_mecha
    from sd_mecha.graph_finalization import open_graph

    with open_graph(sd_mecha.model(str(path))) as graph:
        return graph.finalize_root().model_config.identifier


def assert_same_weights(a, b, components):
    for name in components:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert set(sa) == set(sb), name
        differ = [k for k in sa if not torch.equal(sa[k], sb[k].to(sa[k].dtype))]
        assert not differ, f"{name}: {differ[:3]}"


@pytest.mark.parametrize("arch", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_narrow_real_layout_round_trips_through_from_single_file_and_sd_mecha(tmp_path, arch):
    pipe = make_layout_pipeline(tmp_path / "pipe", arch, prediction_type="v_prediction")
    state = single_file_state(pipe, get_arch(arch), torch.float32)
    prefixes = {"sd15": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
                "sdxl": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                         "conditioner.embedders.1.model.")}[arch]
    assert all(any(k.startswith(p) for k in state) for p in prefixes)
    if arch == "sdxl":  # OpenCLIP layout: packed q/k/v, transposed projection; the v-prediction marker
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in state
        assert "conditioner.embedders.1.model.text_projection" in state
        assert "v_pred" in state
    path = tmp_path / "model.safetensors"
    atomic_save_safetensors(state, path)
    assert mecha_config(path) == {"sd15": "sd1-ldm", "sdxl": "sdxl-sgm"}[arch]
    back = PIPELINES[arch].from_single_file(str(path), config=str(tmp_path / "pipe"), local_files_only=True)
    assert_same_weights(pipe, back, COMPONENTS[arch])
    inputs = probe_inputs(pipe.unet)
    with torch.no_grad():  # equal weights; the two forwards may differ in float summation order only
        want, got = pipe.unet(**inputs).sample, back.unet(**inputs).sample
    assert float((got - want).norm() / want.norm()) < 1e-6


def test_layout_check_names_what_is_not_full_size(tmp_path):
    pipe = make_layout_pipeline(tmp_path / "pipe", "sd15")
    state = single_file_state(pipe, get_arch("sd15"))
    with pytest.raises(ValueError, match="wrong shape.*export with --format diffusers"):
        check_layout(state, get_arch("sd15"))
    del state["first_stage_model.quant_conv.weight"]
    with pytest.raises(ValueError, match="missing.*quant_conv"):
        check_layout(state, get_arch("sd15"))


def test_toy_models_are_refused_before_loading_and_an_existing_file_survives(tmp_path, capsys):
    from tests.test_export_lora import make_merged

    merged = make_merged(tmp_path, "sdxl")
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"older export")
    assert main(["export", "--model", str(merged), "--style", "neon", "--format", "single-file",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not the full-size sdxl architecture" in err and "A1111/ComfyUI" in err and "--format diffusers" in err
    assert out.read_bytes() == b"older export"
    assert main(["export", "--model", str(merged), "--style", "neon", "--format", "single-file",
                 "--out", str(tmp_path / "model"), "--rank", "4"]) == 2
    assert "name it NAME.safetensors" in capsys.readouterr().err


def _merged_full_size(root, arch, dtype):
    """A full-size merged model (random base, styles with a real effect), saved in `dtype`."""
    base = make_layout_pipeline(root / "base", arch, full_size=True, dtype=dtype)
    student = build_student(root / "base", ["neon", "flat"], None).to(dtype)
    student.load_state_dict(base.unet.state_dict(), strict=False)
    del base
    with torch.no_grad():
        for p in student.class_embedding.parameters():
            p.normal_(0, 0.1)
    return export_merged(student, root / "base", root / "merged")


@pytest.mark.slow
def test_full_size_sd15_cli_export_loads_in_diffusers_and_sd_mecha(tmp_path):
    """Run under the memory lock. With the SDXL test: 363 s together (224 s this one) and 14.8 GB peak RSS on
    the 2-core CPU box, shared (load average ~20), 2026-12-01."""
    merged = _merged_full_size(tmp_path, "sd15", torch.float16)
    out = tmp_path / "sd15-neon.safetensors"
    assert main(["export", "--model", str(merged), "--style", "neon", "--format", "single-file",
                 "--dtype", "fp16", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["dmm.layout"] == "sd1-ldm"
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_dtype() == "F16"
    assert mecha_config(out) == "sd1-ldm"
    back = StableDiffusionPipeline.from_single_file(str(out), config=str(tmp_path / "base"),
                                                    local_files_only=True, torch_dtype=torch.float32)
    baked = load_plain_unet(merged / "unet", "neon")
    inputs = probe_inputs(baked)
    with torch.no_grad():
        want, got = baked(**inputs).sample, back.unet(**inputs).sample
    assert float((got - want).norm() / want.norm()) < 2e-3  # fp16 file: the baked bias is rounded once


@pytest.mark.slow
def test_full_size_sdxl_single_file_is_sdxl_sgm_with_every_weight(tmp_path):
    """fp16 throughout (7 GB model, about twice that at peak); compares weights, not outputs."""
    from dmm.export.single_file import export_single_file

    pipe = make_layout_pipeline(tmp_path / "base", "sdxl", full_size=True, dtype=torch.float16,
                                prediction_type="v_prediction", weights=False)
    out = export_single_file(pipe, tmp_path / "sdxl.safetensors", "fp16")
    assert mecha_config(out) == "sdxl-sgm"
    with safe_open(str(out), "pt") as f:
        assert "v_pred" in f.keys()
    back = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tmp_path / "base"), local_files_only=True,
                                                      torch_dtype=torch.float16)
    assert_same_weights(pipe, back, COMPONENTS["sdxl"])
