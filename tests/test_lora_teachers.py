"""LoRA teachers (the paper's SD1.5-LoRA setting): a base with a LoRA file fused at a scale.

The LoRA files are written by the libraries' own savers on tiny SD1.5- and SDXL-shaped pipelines:
- peft layout: peft's `get_peft_model_state_dict` saved by the pipeline's `save_lora_weights`
  (keys `unet.<module>.lora_A.weight`, rank and alpha in the file's metadata);
- diffusers layout: the same saver with diffusers' pre-peft names (`.lora.down` / `.lora.up` in
  the UNet, `convert_state_dict_to_diffusers` -> `.lora_linear_layer.` in the text encoders);
  that layout has no alpha, so these files use alpha = rank;
- kohya layout: diffusers' `convert_state_dict_to_kohya` (`lora_unet_*`, `lora_te1_*`, `.alpha`),
  with every text-encoder name under `text_model.` as in real kohya files (transformers 5 drops that
  level from CLIPTextModel; diffusers strips it again) and each
  `.alpha` set to the adapter's alpha. For SDXL it keeps diffusers' block names
  (`lora_unet_down_blocks_*`); kohya's own SDXL trainer writes SGM names (`input_blocks_*`),
  which diffusers maps with `_maybe_map_sgm_blocks_to_diffusers` (not covered here: no
  in-package writer of that layout).
Each must load to exactly W + scale * alpha / rank * up @ down.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from dmm.recipes import RecipeError, parse_recipe
from dmm.teachers import TeacherFileError, fuse_lora_teacher, load_teacher_parts
from dmm.testing import build_tiny_world, make_tiny_pipeline, tiny_recipe_dict

RANK, ALPHA, SCALE = 4, 2.0, 0.7
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_bases")
    for arch in ("sd15", "sdxl"):
        make_tiny_pipeline(root / arch, arch)
    return root


def _pipe(path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path), local_files_only=True)


def make_lora(base, out, layout, *, text_encoders=True, seed=0, alpha=ALPHA):
    """Write a random LoRA for `base` in `layout`; returns (file, {component: (base weights, peft dict)})."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = _pipe(base)
    alpha = float(RANK) if layout == "diffusers" else alpha
    g = torch.Generator().manual_seed(seed)
    comps = ["unet"] + ([c for c in ("text_encoder", "text_encoder_2") if hasattr(pipe, c)] if text_encoders else [])
    truth, configs = {}, {}
    for comp in comps:
        model = getattr(pipe, comp)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        configs[comp] = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=UNET_TARGETS if comp == "unet" else TE_TARGETS)
        inject_adapter_in_model(configs[comp], model, adapter_name="default")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        truth[comp] = (before, get_peft_model_state_dict(model))
    file = out / f"{layout}.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    if layout == "kohya":
        named = {f"{c}.{'' if c == 'unet' or k.startswith('text_model.') else 'text_model.'}{k}": v
                 for c, (_, sd) in truth.items() for k, v in sd.items()}
        kohya = convert_state_dict_to_kohya(named)
        save_file({k: torch.tensor(alpha) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()},
                  str(file))
        return file, truth
    layers, meta = {}, {}
    for comp, (_, sd) in truth.items():
        if layout == "diffusers":
            sd = ({k.replace("lora_A", "lora.down").replace("lora_B", "lora.up"): v for k, v in sd.items()}
                  if comp == "unet" else convert_state_dict_to_diffusers(sd))
        else:
            meta[f"{comp}_lora_adapter_metadata"] = configs[comp].to_dict()
        layers[f"{comp}_lora_layers"] = sd
    type(pipe).save_lora_weights(str(out), weight_name=file.name, **layers, **meta)
    return file, truth


def fused_reference(before, peft_sd, scale=SCALE, alpha=ALPHA):
    """W + scale * alpha / rank * up @ down for every adapted module, computed directly."""
    out = dict(before)
    for key, down in peft_sd.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            up = peft_sd[key.replace("lora_A", "lora_B")]
            w = before[f"{module}.weight"]
            out[f"{module}.weight"] = w + scale * alpha / RANK * (up.flatten(1) @ down.flatten(1)).view(w.shape)
    return out


@pytest.mark.parametrize("layout", ["kohya", "diffusers", "peft"])
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_each_layout_fuses_to_the_directly_computed_weights(bases, tmp_path, arch, layout):
    file, truth = make_lora(bases / arch, tmp_path, layout)
    parts = fuse_lora_teacher(file, bases / arch, SCALE)
    alpha = float(RANK) if layout == "diffusers" else ALPHA
    assert set(parts.encoders()) == set(truth) - {"unet"}  # the LoRA's encoders are the teacher's own
    for comp, (before, sd) in truth.items():
        got, want = getattr(parts, comp).state_dict(), fused_reference(before, sd, alpha=alpha)
        assert set(got) == set(want), f"{comp}: LoRA layers left behind after fusing"
        changed = [k for k in want if not torch.equal(want[k], before[k])]
        assert changed, comp
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=f"{comp}.{k}")


def test_unet_only_lora_keeps_the_base_encoders_and_policies(bases, tmp_path):
    file, _ = make_lora(bases / "sd15", tmp_path / "u", "peft", text_encoders=False)
    parts = fuse_lora_teacher(file, bases / "sd15", 1.0)
    assert parts.encoders() == {}
    with pytest.raises(TeacherFileError, match="text_encoder: own, but peft.safetensors adapts no text encoder"):
        fuse_lora_teacher(file, bases / "sd15", 1.0, text_encoder="own")
    both, _ = make_lora(bases / "sd15", tmp_path / "b", "peft")
    assert fuse_lora_teacher(both, bases / "sd15", 1.0, text_encoder="base").encoders() == {}
    # through the format registry, as the pool loads it (options from a recipe)
    loaded = load_teacher_parts(both, "lora", base=bases / "sd15", options={"scale": SCALE})
    assert set(loaded.encoders()) == {"text_encoder"}


def test_a_lora_for_another_base_is_refused_naming_the_modules(bases, tmp_path):
    file, _ = make_lora(bases / "sdxl", tmp_path / "xl", "peft")
    with pytest.raises(TeacherFileError, match=r"\['text_encoder_2'\] parts but the base .* has no such component"):
        fuse_lora_teacher(file, bases / "sd15", 1.0)
    file, _ = make_lora(bases / "sdxl", tmp_path / "xl_unet", "peft", text_encoders=False)
    with pytest.raises(TeacherFileError, match=r"(not in the base's|do not fit the base's) unet.*attn2\.to_k"):
        fuse_lora_teacher(file, bases / "sd15", 1.0)
    kohya, _ = make_lora(bases / "sd15", tmp_path / "k", "kohya")
    # a module the base does not have (another block layout): named, not skipped
    renamed = {k.replace("lora_unet_up_blocks_0_attentions_1", "lora_unet_up_blocks_0_attentions_7"): v
               for k, v in load_file(str(kohya)).items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(TeacherFileError, match=r"not in the base's unet: up_blocks\.0\.attentions\.7\."):
        fuse_lora_teacher(tmp_path / "renamed.safetensors", bases / "sd15", 1.0)
    # a module whose width differs from the base's
    state = load_file(str(kohya))
    key = next(k for k in state if k.startswith("lora_unet_") and "attn1_to_q.lora_down" in k)
    state[key] = torch.randn(RANK, state[key].shape[1] * 2)
    save_file(state, str(tmp_path / "wide.safetensors"))
    with pytest.raises(TeacherFileError, match=r"do not fit the base's unet shapes: .*attn1\.to_q"):
        fuse_lora_teacher(tmp_path / "wide.safetensors", bases / "sd15", 1.0)


def test_keys_diffusers_would_skip_silently_are_refused(bases, tmp_path):
    """UNet keys in the text encoders' `lora_linear_layer` naming: diffusers injects the attention
    adapters but loads none of their weights, with a warning at most."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    _, truth = make_lora(bases / "sd15", tmp_path, "peft", text_encoders=False)
    _, sd = truth["unet"]
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), weight_name="odd.safetensors",
                                              unet_lora_layers=convert_state_dict_to_diffusers(sd))
    with pytest.raises(TeacherFileError, match=r"unet keys are not LoRA weights diffusers can convert: .*attn1"):
        fuse_lora_teacher(tmp_path / "odd.safetensors", bases / "sd15", 1.0)
    kohya, _ = make_lora(bases / "sd15", tmp_path / "k", "kohya", text_encoders=False)
    dora = load_file(str(kohya))
    name = next(k for k in dora if k.endswith(".lora_down.weight")).split(".")[0]
    dora[f"{name}.dora_scale"] = torch.ones(1, dora[f"{name}.lora_down.weight"].shape[1])
    save_file(dora, str(tmp_path / "dora.safetensors"))
    with pytest.raises(TeacherFileError, match=r"is a DoRA \(1 dora_scale tensors"):
        fuse_lora_teacher(tmp_path / "dora.safetensors", bases / "sd15", 1.0)
    save_file({"down_blocks.0.resnets.0.conv1.lora.down.weight": torch.zeros(RANK, 4)},
              str(tmp_path / "unprefixed.safetensors"))
    with pytest.raises(TeacherFileError, match=r"keys under \['down_blocks'\] belong to no part"):
        fuse_lora_teacher(tmp_path / "unprefixed.safetensors", bases / "sd15", 1.0)


# ----------------------------------------------------------------------------- recipes
def test_recipe_short_form_folds_into_the_format_options(tmp_path):
    world = build_tiny_world(tmp_path / "w", "sd15", teachers=1)
    raw = tiny_recipe_dict(world, tmp_path / "run")
    raw["teachers"] = [{"name": "ink", "lora": "ink.safetensors", "scale": 0.8, "base": str(world.base)}]
    (tmp_path / "ink.safetensors").touch()
    recipe = parse_recipe(raw, base=tmp_path)
    t = recipe.teachers[0]
    assert (t.format, t.path, t.options) == ("lora", str(tmp_path / "ink.safetensors"),
                                              {"scale": 0.8, "base": str(world.base)})
    assert parse_recipe(recipe.to_dict()).teachers[0].options == t.options  # a saved recipe reads back
    raw["teachers"] = [{"name": "ink", "lora": "ink.safetensors"}]
    assert parse_recipe(raw, base=tmp_path).teachers[0].options == {"scale": 1.0}  # base: model.base
    for teacher, message in (
            ({"name": "x", "lora": "a.safetensors", "path": "b"}, "either `path`"),
            ({"name": "x", "path": "b", "scale": 0.5}, "`base` and `scale` belong to LoRA teachers"),
            ({"name": "x"}, "give `path`"),
            ({"name": "x", "lora": "a.safetensors", "format": "diffusers"}, "format lora"),
            ({"name": "x", "lora": "a.safetensors", "scale": 0.5, "options": {"scale": 0.9}}, "disagrees")):
        raw["teachers"] = [teacher]
        with pytest.raises(RecipeError, match=message):
            parse_recipe(raw, base=tmp_path)


@pytest.mark.slow
def test_a_few_training_steps_with_lora_teachers(tmp_path):
    """Two LoRA teachers (one with its own text encoder) on the tiny SD1.5 world, trained and exported."""
    from dmm.pipeline import load_merged
    from dmm.train.run import run

    world = build_tiny_world(tmp_path / "w", "sd15", teachers=1)
    ink, _ = make_lora(world.base, tmp_path / "ink", "kohya", seed=1)
    pix, _ = make_lora(world.base, tmp_path / "pix", "peft", text_encoders=False, seed=2)
    raw = tiny_recipe_dict(world, tmp_path / "run", train={"max_steps": 2, "checkpoint_every": 2},
                           log={"samples": False})
    raw["teachers"] = [{"name": "ink", "lora": str(ink), "scale": 0.8}, {"name": "pixel", "lora": str(pix)}]
    merged = run(parse_recipe(raw))
    assert load_merged(merged).unet.style_names == ["ink", "pixel"]


def test_a_lora_teacher_folder_for_samplers_is_written_once(bases, tmp_path):
    """eval samples teachers from pipeline folders: a LoRA teacher is fused into one, then reused."""
    from dmm.recipes import TeacherSpec
    from dmm.teachers.lora import teacher_folder

    file, _ = make_lora(bases / "sd15", tmp_path / "l", "kohya")
    spec = TeacherSpec(name="ink", path=str(file), format="lora", options={"scale": SCALE})
    folder = teacher_folder(spec, bases / "sd15", tmp_path / "cache")
    pipe, parts = _pipe(folder), fuse_lora_teacher(file, bases / "sd15", SCALE)
    for comp in ("unet", "text_encoder"):
        want = getattr(parts, comp).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in getattr(pipe, comp).state_dict().items()), comp
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert teacher_folder(spec, bases / "sd15", tmp_path / "cache") == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    plain = TeacherSpec(name="full", path=str(bases / "sd15"))
    assert teacher_folder(plain, bases / "sd15", tmp_path / "cache") == bases / "sd15"
