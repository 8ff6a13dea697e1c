"""Teachers as users have them: original-layout (LDM/SGM) single files with text encoders, VAE,
EMA copies, fp16; diffusers pipeline folders with their own text encoders; each loads to exactly
the weights of the diffusers original, and bad files are refused naming the teacher and the fix.

Tiny original-layout files are written from tiny diffusers pipelines by inverting diffusers' own
converter (tests/original_layout.py), so a loader bug cannot hide behind a hand-kept key table.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dmm.recipes import TeacherSpec
from dmm.teachers import TeacherLoadError, TeacherParts, load_teacher, load_teacher_parts
from dmm.testing import make_tiny_pipeline
from tests.original_layout import pipeline_to_original, unet_key_map

ARCHS = ("sd15", "sdxl")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """arch -> (base folder, pipeline) for a tiny SD1.5- and SDXL-shaped base."""
    out = {}
    for arch in ARCHS:
        folder = tmp_path_factory.mktemp(f"base_{arch}")
        out[arch] = (folder, make_tiny_pipeline(folder, arch))
    return out


def _same(model, state: dict) -> bool:
    mine = model.state_dict()
    return set(mine) == set(state) and all(torch.equal(mine[k], v) for k, v in state.items())


def _perturbed(module, seed: int, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in module.state_dict().items()}


def _teacher(base, path, text_encoder="auto", **kw):
    folder, pipe = base
    spec = TeacherSpec(name="neon", path=str(path), text_encoder=text_encoder, **kw)
    return load_teacher(0, spec, base=str(folder), student_base=pipe.unet, dtype="float32",
                        default_prediction_type="epsilon")


# ----------------------------------------------------------------------------- original-layout files
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("extras", ["unet_only", "with_text_encoders_and_vae", "fp16", "ema"])
def test_original_single_file_loads_exactly_the_diffusers_weights(bases, tmp_path, arch, extras):
    folder, pipe = bases[arch]
    unet = _perturbed(pipe.unet, seed=1)
    ema = _perturbed(pipe.unet, seed=2) if extras == "ema" else None
    state = pipeline_to_original(pipe, arch, unet_state=unet, text_encoders=extras != "unet_only",
                                 vae=extras != "unet_only", ema=ema)
    if extras == "fp16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        unet = {k: v.half().float() for k, v in unet.items()}
    file = tmp_path / "teacher.safetensors"
    save_file(state, str(file))
    parts = load_teacher_parts(file, base=folder)
    assert isinstance(parts, TeacherParts) and _same(parts.unet, unet)
    assert parts.text_encoder is None and parts.text_encoder_2 is None  # its encoders are the base's
    if ema is not None:
        assert _same(load_teacher_parts(file, base=folder, options={"use_ema": True}).unet, ema)


@pytest.mark.parametrize("arch", ARCHS)
def test_own_text_encoders_of_a_single_file(bases, tmp_path, arch):
    folder, pipe = bases[arch]
    names = ("text_encoder", "text_encoder_2")[: 1 + (arch == "sdxl")]
    file = tmp_path / "teacher.safetensors"
    save_file(pipeline_to_original(pipe, arch), str(file))
    own = load_teacher_parts(file, base=folder, text_encoder="own")  # equal to the base's: kept anyway
    for name in names:
        assert _same(getattr(own, name), getattr(pipe, name).state_dict())
    # A fine-tune whose first encoder was trained: auto keeps exactly that one, base keeps none.
    tuned = _perturbed(pipe.text_encoder, seed=5)
    original = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    pipe.text_encoder.load_state_dict(tuned)
    try:
        save_file(pipeline_to_original(pipe, arch), str(file))
    finally:
        pipe.text_encoder.load_state_dict(original)
    auto = load_teacher_parts(file, base=folder)
    assert _same(auto.text_encoder, tuned) and auto.text_encoder_2 is None
    assert not load_teacher_parts(file, base=folder, text_encoder="base").encoders()


def test_fp16_copy_of_the_base_encoder_is_the_base_encoder(bases, tmp_path):
    folder, pipe = bases["sd15"]
    state = {k: v.half() if v.is_floating_point() else v for k, v in pipeline_to_original(pipe, "sd15").items()}
    save_file(state, str(tmp_path / "t.safetensors"))
    assert load_teacher_parts(tmp_path / "t.safetensors", base=folder).text_encoder is None


def test_original_layout_pickled_checkpoint(bases, tmp_path):
    folder, pipe = bases["sd15"]
    torch.save({"state_dict": pipeline_to_original(pipe, "sd15")}, tmp_path / "t.ckpt")
    with pytest.raises(ValueError, match="allow_pickle: true"):
        load_teacher_parts(tmp_path / "t.ckpt", base=folder)
    parts = load_teacher_parts(tmp_path / "t.ckpt", base=folder, allow_pickle=True, text_encoder="own")
    assert _same(parts.unet, pipe.unet.state_dict())
    assert _same(parts.text_encoder, pipe.text_encoder.state_dict())


def test_bfloat16_teacher_loads_straight_into_bfloat16(bases, tmp_path):
    folder, pipe = bases["sdxl"]
    save_file(pipeline_to_original(pipe, "sdxl"), str(tmp_path / "t.safetensors"))
    parts = load_teacher_parts(tmp_path / "t.safetensors", base=folder, dtype=torch.bfloat16, text_encoder="own")
    for module in (parts.unet, parts.text_encoder, parts.text_encoder_2):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert torch.equal(parts.unet.conv_in.weight, pipe.unet.conv_in.weight.bfloat16())


# ----------------------------------------------------------------------------- diffusers folders
def _folder_teacher(base_folder, pipe, path, *, tune_text_encoder: bool):
    """A pipeline-folder teacher: the base copied, UNet perturbed, text encoder optionally too."""
    shutil.copytree(base_folder, path)
    unet = type(pipe.unet).from_pretrained(str(base_folder / "unet"))
    unet.load_state_dict(_perturbed(unet, seed=7))
    unet.save_pretrained(str(path / "unet"))
    if tune_text_encoder:
        encoder = type(pipe.text_encoder).from_pretrained(str(base_folder / "text_encoder"))
        encoder.load_state_dict(_perturbed(encoder, seed=8))
        encoder.save_pretrained(str(path / "text_encoder"))
        return unet, encoder
    return unet, None


def test_pipeline_folder_teacher_with_a_tuned_text_encoder(bases, tmp_path):
    folder, pipe = bases["sdxl"]
    unet, encoder = _folder_teacher(folder, pipe, tmp_path / "neon", tune_text_encoder=True)
    auto = _teacher(bases["sdxl"], tmp_path / "neon")
    assert _same(auto.unet, unet.state_dict())
    assert _same(auto.text_encoder, encoder.state_dict()) and auto.text_encoder_2 is None
    assert not auto.text_encoder.training and not any(p.requires_grad for p in auto.text_encoder.parameters())
    base = _teacher(bases["sdxl"], tmp_path / "neon", text_encoder="base")
    assert base.text_encoder is None and base.text_encoder_2 is None
    # Equal to the base's: auto uses the base's; own keeps the teacher's anyway (documented choice).
    _folder_teacher(folder, pipe, tmp_path / "plain", tune_text_encoder=False)
    assert _teacher(bases["sdxl"], tmp_path / "plain").text_encoder is None
    own = _teacher(bases["sdxl"], tmp_path / "plain", text_encoder="own")
    assert _same(own.text_encoder, pipe.text_encoder.state_dict())
    assert _same(own.text_encoder_2, pipe.text_encoder_2.state_dict())


def test_own_is_refused_for_a_teacher_without_encoders(bases, tmp_path):
    folder, pipe = bases["sd15"]
    save_file(pipeline_to_original(pipe, "sd15", text_encoders=False), str(tmp_path / "neon.safetensors"))
    with pytest.raises(TeacherLoadError, match=r"^teacher 'neon' \(.*neon.safetensors\): text_encoder: own, but "
                                               r"neon.safetensors brings no text_encoder of its own; use "
                                               r"text_encoder: auto .* or base$"):
        _teacher(bases["sd15"], tmp_path / "neon.safetensors", text_encoder="own")
    with pytest.raises(TeacherLoadError, match="unet brings no text_encoder of its own"):
        _teacher(bases["sd15"], folder / "unet", text_encoder="own")


def test_text_encoder_of_another_shape_is_named(bases, tmp_path):
    folder, _ = bases["sd15"]
    path = tmp_path / "neon"
    shutil.copytree(folder, path)
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
    config.intermediate_size = 48
    CLIPTextModel(config).save_pretrained(str(path / "text_encoder"))
    with pytest.raises(TeacherLoadError, match=r"^teacher 'neon' .*: neon: its text_encoder does not have the "
                                               r"base's shape: encoder.layers.0.mlp.fc1.weight is \(48, 32\) in the "
                                               r"teacher, the base wants \(64, 32\); use text_encoder: base"):
        _teacher(bases["sd15"], path)
    assert _teacher(bases["sd15"], path, text_encoder="base").text_encoder is None


# ----------------------------------------------------------------------------- bad input
def test_sdxl_file_given_to_an_sd15_recipe(bases, tmp_path):
    _, xl = bases["sdxl"]
    save_file(pipeline_to_original(xl, "sdxl"), str(tmp_path / "neon.safetensors"))
    with pytest.raises(TeacherLoadError, match=r"^teacher 'neon' \(.*\): neon.safetensors is an SDXL checkpoint "
                                               r"\(original layout: keys conditioner.embedders.\* / label_emb\) but "
                                               r"the recipe's base is SD1.5; merge fine-tunes of the base only$"):
        _teacher(bases["sd15"], tmp_path / "neon.safetensors")
    save_file(pipeline_to_original(bases["sd15"][1], "sd15"), str(tmp_path / "old.safetensors"))
    with pytest.raises(TeacherLoadError, match="old.safetensors is an SD1.5 checkpoint .* the recipe's base is SDXL"):
        _teacher(bases["sdxl"], tmp_path / "old.safetensors")


def test_unrecognised_architecture_says_what_was_expected_and_found(bases, tmp_path):
    save_file({"encoder.block.0.weight": torch.zeros(2), "decoder.block.0.weight": torch.zeros(2)},
              str(tmp_path / "neon.safetensors"))
    with pytest.raises(TeacherLoadError, match=r"^teacher 'neon' .*: neon.safetensors: cannot recognise the "
                                               r"architecture of this file: expected the original SD/SDXL layout "
                                               r"\(keys starting with 'model.diffusion_model.'\) or the base UNet's "
                                               r"diffusers keys .*found keys starting with \['decoder', 'encoder'\]"):
        _teacher(bases["sd15"], tmp_path / "neon.safetensors")


def test_truncated_original_file_names_teacher_and_path(bases, tmp_path):
    _, pipe = bases["sd15"]
    save_file(pipeline_to_original(pipe, "sd15"), str(tmp_path / "full.safetensors"))
    bad = tmp_path / "neon.safetensors"
    bad.write_bytes((tmp_path / "full.safetensors").read_bytes()[:-1000])
    with pytest.raises(TeacherLoadError, match=rf"^teacher 'neon' \({bad}\): neon.safetensors is not a readable "
                                               r"safetensors file \(truncated or corrupt: .*\); re-download"):
        _teacher(bases["sd15"], bad)


@pytest.mark.parametrize("where", ["unet", "text_encoder"])
def test_nan_in_an_original_file_is_named_at_load(bases, tmp_path, where):
    _, pipe = bases["sd15"]
    state = pipeline_to_original(pipe, "sd15")
    key = ("model.diffusion_model.middle_block.0.in_layers.2.weight" if where == "unet"
           else "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight")
    state[key] = state[key].clone()
    state[key].view(-1)[3] = float("nan")
    save_file(state, str(tmp_path / "neon.safetensors"))
    expected = ("non-finite weights, first in mid_block.resnets.0.conv1.weight (1 of " if where == "unet" else
                "non-finite weights in its text_encoder, first in encoder.layers.1.mlp.fc2.weight (1 of ")
    with pytest.raises(TeacherLoadError, match=rf"^teacher 'neon' \(.*\): {re.escape(expected)}"):
        _teacher(bases["sd15"], tmp_path / "neon.safetensors")


def test_use_ema_without_ema_weights_is_refused(bases, tmp_path):
    folder, pipe = bases["sd15"]
    save_file(pipeline_to_original(pipe, "sd15"), str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError, match=r"t.safetensors has no EMA weights \(no key starts with 'model_ema.'\); "
                                         "drop options.use_ema"):
        load_teacher_parts(tmp_path / "t.safetensors", base=folder, options={"use_ema": True})


def test_unet_unlike_the_base_is_refused_naming_key_and_shapes(bases, tmp_path):
    _, pipe = bases["sd15"]
    state = pipeline_to_original(pipe, "sd15")
    key = "model.diffusion_model.output_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    state[key] = torch.zeros(state[key].shape[0], 48)  # another text width (an SD2-like fine-tune)
    save_file(state, str(tmp_path / "neon.safetensors"))
    with pytest.raises(TeacherLoadError, match=r"^teacher 'neon' .*: neon.safetensors: tensor "
                                               r"up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight has "
                                               r"shape \(32, 48\) but the base UNet's config wants \(32, 32\)"):
        _teacher(bases["sd15"], tmp_path / "neon.safetensors")
    state = pipeline_to_original(pipe, "sd15")
    state["model.diffusion_model.output_blocks.9.0.in_layers.0.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "neon.safetensors"))
    with pytest.raises(TeacherLoadError, match=r"neon.safetensors: 1 UNet tensors have no place in the base's UNet "
                                               r"\(e.g. model.diffusion_model.output_blocks.9.0.in_layers.0.weight\)"):
        _teacher(bases["sd15"], tmp_path / "neon.safetensors")


# ----------------------------------------------------------------------------- a user loader's encoders
def test_a_user_loader_returning_parts_gets_the_policy_applied(bases, tmp_path):
    from dmm.teachers.formats import TEACHER_FORMATS

    folder, pipe = bases["sd15"]

    def load_parts(path, *, base, allow_pickle, options):
        unet = type(pipe.unet).from_pretrained(str(base / "unet"))
        encoder = type(pipe.text_encoder).from_pretrained(str(base / "text_encoder"))
        if path.name == "tuned":
            encoder.load_state_dict(_perturbed(encoder, seed=3))
        return TeacherParts(unet, text_encoder=encoder)

    TEACHER_FORMATS.register("parts_test", description="test loader returning TeacherParts")(load_parts)
    try:
        for name in ("tuned", "same"):
            (tmp_path / name).mkdir()
        assert load_teacher_parts(tmp_path / "same", "parts_test", base=folder).text_encoder is None
        assert load_teacher_parts(tmp_path / "tuned", "parts_test", base=folder).text_encoder is not None
        assert load_teacher_parts(tmp_path / "tuned", "parts_test", base=folder, text_encoder="base").text_encoder \
            is None
        assert load_teacher_parts(tmp_path / "same", "parts_test", base=folder, text_encoder="own").text_encoder \
            is not None
    finally:
        TEACHER_FORMATS.remove("parts_test")


# ----------------------------------------------------------------------------- real key names at full size
@pytest.mark.parametrize("arch", ARCHS)
def test_the_inverse_gives_real_original_key_names_at_full_size(arch):
    """At SD1.5/SDXL size the test inverse yields exactly the UNet keys real files have (sd-mecha's
    lists), and the loader's plan (diffusers' converter on those names) places every one of them."""
    from diffusers import UNet2DConditionModel
    from sd_mecha.extensions import model_configs

    from dmm.models.arch import sd15_unet_config, sdxl_unet_config
    from dmm.teachers.formats import ldm_unet_plan

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(sd15_unet_config() if arch == "sd15" else sdxl_unet_config()))
    config = dict(unet.config)
    real = {k for k in model_configs.resolve("sd1-ldm" if arch == "sd15" else "sdxl-sgm").keys()  # noqa: SIM118
            if k.startswith("model.diffusion_model.")}
    ours = {"model.diffusion_model." + v for v in unet_key_map(list(unet.state_dict()), config).values()}
    assert ours == real
    plan = ldm_unet_plan(sorted(real), config, use_ema=False)
    assert set(plan) == set(unet.state_dict()) and set(plan.values()) == real

