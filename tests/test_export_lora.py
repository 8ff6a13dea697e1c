"""`dmm export --format lora`: a kohya LoRA of one style against the base model. The test of
its correctness is diffusers' own LoRA loading (`load_lora_weights`, peft): the base pipeline
with the LoRA loaded must reproduce the baked UNet within the error the export reports, and
exactly where the difference is of low rank."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from dmm.cli import main
from dmm.export.lora import extract_lora, lora_layers, probe_inputs, report_path, write_lora
from dmm.pipeline import MergedModelError, export_baked, load_plain_unet
from dmm.testing import make_layout_pipeline, make_teacher, make_tiny_pipeline
from dmm.train.export import build_student, export_merged

STYLES = ["neon", "flat"]


def make_merged(root, arch="sd15", low_rank: bool = False):
    """A tiny merged model trained "from" root/base: its weights are the base's plus a perturbation
    (full-rank noise on every tensor, or rank 2 on Linear/Conv weights only), its styles differ."""
    make_tiny_pipeline(root / "base", arch=arch)
    if low_rank:
        tuned = UNet2DConditionModel.from_pretrained(str(root / "base" / "unet"))
        _add_low_rank(tuned, rank=2)
        state = tuned.state_dict()
    else:
        make_teacher(root / "base", root / "teacher", seed=5, scale=0.05)
        state = UNet2DConditionModel.from_pretrained(str(root / "teacher" / "unet")).state_dict()
    student = build_student(root / "base", STYLES, None)
    student.load_state_dict(state, strict=False)
    if not low_rank:  # a zero codebook bakes nothing into the biases, which a LoRA cannot carry
        torch.manual_seed(3)
        with torch.no_grad():
            for p in student.class_embedding.parameters():
                p.normal_(0, 0.5)
    return export_merged(student, root / "base", root / "merged")


def _add_low_rank(unet, rank):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in lora_layers(unet).values():
            w = module.weight
            a, b = torch.randn(w.shape[0], rank, generator=g), torch.randn(rank, w[0].numel(), generator=g)
            w.add_((a @ b).reshape(w.shape) * 0.01)


def lora_output(base_folder, lora, inputs):
    """The base pipeline's UNet output with the LoRA loaded by diffusers itself."""
    pipe = DiffusionPipeline.from_pretrained(str(base_folder), local_files_only=True)
    pipe.load_lora_weights(str(lora))
    with torch.no_grad():
        return pipe.unet(**inputs).sample


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return make_merged(tmp_path_factory.mktemp("lora"))


def test_cli_lora_reports_its_error_and_diffusers_loading_reproduces_it(merged, tmp_path, capsys):
    out = tmp_path / "neon.safetensors"
    assert main(["export", "--model", str(merged), "--style", "neon", "--format", "lora", "--rank", "4",
                 "--base", str(merged.parent / "base"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "relative Frobenius error max" in printed and "probe input" in printed
    report = json.loads(report_path(out).read_text())
    assert report["rank"] == 4 and report["layout"] == "diffusers" and report["dtype"] == "float16"
    assert 0 < report["layer_error"]["mean"] <= report["layer_error"]["max"] < 1
    assert report["full_rank_layers"] == []  # the toy's conv_in/conv_out allow rank 4
    baked = load_plain_unet(merged / "unet", "neon")
    inputs = probe_inputs(baked)
    with torch.no_grad():
        want = baked(**inputs).sample
    got = lora_output(merged.parent / "base", out, inputs)
    # the LoRA as diffusers loads it is exactly as far from the baked UNet as reported
    assert rel(got, want) == pytest.approx(report["probe_error"]["relative_to_output"], rel=1e-2, abs=1e-5)
    assert report["probe_error"]["relative_to_style_change"] > 0


@pytest.mark.parametrize("arch", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])  # SDXL: 794 layers
def test_a_low_rank_difference_comes_back_exactly(tmp_path, arch):
    """Real layouts (narrow widths): SD1.5 in kohya's diffusers names, SDXL in SGM names, convs too."""
    pipe = make_layout_pipeline(tmp_path / "base", arch)
    tuned = copy.deepcopy(pipe.unet)
    _add_low_rank(tuned, rank=2)
    tensors, report = extract_lora(copy.deepcopy(pipe.unet), tuned, rank=2, dtype=torch.float32)
    assert report["layout"] == {"sd15": "diffusers", "sdxl": "sgm"}[arch]
    assert report["layers"] == len(lora_layers(tuned))  # every Linear and Conv2d
    name = {"sd15": "lora_unet_up_blocks_0_upsamplers_0_conv", "sdxl": "lora_unet_input_blocks_4_1_proj_in"}[arch]
    assert f"{name}.lora_down.weight" in tensors
    assert report["layer_error"]["max"] < 1e-5 and report["probe_error"]["relative_to_output"] < 1e-5
    out = write_lora(tensors, report, tmp_path / "style.safetensors")
    inputs = probe_inputs(tuned)
    with torch.no_grad():
        want = tuned(**inputs).sample
    assert rel(lora_output(tmp_path / "base", out, inputs), want) < 1e-5


def test_toy_sdxl_leaves_the_added_embedding_out_and_says_so(tmp_path):
    merged = make_merged(tmp_path, "sdxl", low_rank=True)
    out = export_baked(merged, "neon", tmp_path / "neon.safetensors", "lora", rank=2, base=tmp_path / "base",
                       dtype="fp32")
    report = json.loads(report_path(out).read_text())
    assert report["not_carried"]["tensors"] == 2 and 0 < report["not_carried"]["share_of_difference"] < 1
    assert not any("add_embedding" in k for k in report["per_layer_error"])
    baked = load_plain_unet(merged / "unet", "neon")
    inputs = probe_inputs(baked)
    with torch.no_grad():
        want = baked(**inputs).sample
    got = lora_output(tmp_path / "base", out, inputs)
    assert rel(got, want) == pytest.approx(report["probe_error"]["relative_to_output"], rel=1e-3, abs=1e-6)


def test_bad_requests_are_refused_before_any_weight_loads_and_keep_the_old_file(merged, tmp_path, capsys):
    out = tmp_path / "neon.safetensors"
    out.write_bytes(b"older export")
    base = str(merged.parent / "base")

    def refused(*extra):
        argv = ["export", "--model", str(merged), "--format", "lora", "--out", str(out), *extra]
        assert main(argv) == 2
        return capsys.readouterr().err

    err = refused("--style", "neon", "--rank", "17", "--base", base)
    assert "--rank 17 is larger than layer down_blocks.0" in err and "--rank 16 or less" in err
    assert "pixel" in refused("--style", "pixel", "--rank", "4", "--base", base)
    assert "--rank and --base go with --format lora" in refused("--style", "neon", "--rank", "4")
    assert "holds no UNet" in refused("--style", "neon", "--rank", "4", "--base", str(tmp_path))
    other = tmp_path / "other"
    make_tiny_pipeline(other, arch="sdxl")
    assert "another architecture" in refused("--style", "neon", "--rank", "4", "--base", str(other))
    assert "merged style UNet" in refused("--style", "neon", "--rank", "4", "--base", str(merged))
    assert out.read_bytes() == b"older export" and not report_path(out).exists()
    with pytest.raises(MergedModelError, match="--rank and --base go with --format lora"):
        export_baked(merged, "neon", tmp_path / "x.safetensors", "single-file", rank=4)
