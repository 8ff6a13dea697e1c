import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dmm.schema import ConfigError
from dmm.teachers import TEACHER_FORMATS, TeacherLoadError, list_formats, load_teacher_unet
from dmm.teachers.pool import first_shape_mismatch
from dmm.testing import make_teacher, make_tiny_pipeline


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    make_tiny_pipeline(root, "sdxl")
    return root


def test_formats_are_registered():
    assert {"auto", "diffusers", "single_file", "ckpt"} <= set(list_formats())


def test_pipeline_folder_and_unet_folder(base):
    a = load_teacher_unet(base, base=base)
    b = load_teacher_unet(base / "unet", base=base)
    assert first_shape_mismatch(a.state_dict(), b.state_dict()) is None


def test_single_safetensors_in_diffusers_layout(base, tmp_path):
    unet = load_teacher_unet(base, base=base)
    save_file(unet.state_dict(), str(tmp_path / "t.safetensors"))
    loaded = load_teacher_unet(tmp_path / "t.safetensors", base=base)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_pickle_needs_opt_in_and_loads_weights_only(base, tmp_path):
    unet = load_teacher_unet(base, base=base)
    torch.save(unet.state_dict(), tmp_path / "t.ckpt")
    with pytest.raises(ValueError, match="allow_pickle: true"):
        load_teacher_unet(tmp_path / "t.ckpt", base=base)
    loaded = load_teacher_unet(tmp_path / "t.ckpt", base=base, allow_pickle=True)
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"conv_in.weight": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_teacher_unet(tmp_path / "evil.ckpt", base=base, allow_pickle=True)


def test_wrong_layout_and_missing_path(base, tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"cannot recognise the architecture of this file: expected the original "
                                         r"SD/SDXL layout \(keys starting with 'model.diffusion_model.'\) or the base "
                                         r"UNet's diffusers keys \(e.g. 'conv_in.weight'\), found keys starting with "
                                         r"\['foo'\]"):
        load_teacher_unet(tmp_path / "bad.safetensors", base=base)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher_unet(tmp_path / "missing", base=base)
    with pytest.raises(ValueError, match="unknown teacher format 'gguf'"):
        load_teacher_unet(base, "gguf", base=base)


# ----------------------------------------------------------------- the format registry and plugins
def test_formats_are_registry_entries_with_descriptions_and_options():
    from dmm.registry import get_registry

    reg = get_registry("teacher format")
    assert reg is TEACHER_FORMATS
    assert list_formats()[0] == "auto" and set(list_formats()) == set(reg.names())
    assert reg.get("single_file").parse_options({"key_prefix": "unet."}).key_prefix == "unet."
    with pytest.raises(ConfigError, match="unknown key 'options.key_prefx'; did you mean 'key_prefix'"):
        reg.get("single_file").parse_options({"key_prefx": "unet."})


def test_options_reach_the_loader(base, tmp_path):
    unet = load_teacher_unet(base, base=base)
    save_file({f"unet.{k}": v for k, v in unet.state_dict().items()}, str(tmp_path / "prefixed.safetensors"))
    with pytest.raises(ValueError, match="set options.key_prefix"):
        load_teacher_unet(tmp_path / "prefixed.safetensors", base=base)
    loaded = load_teacher_unet(tmp_path / "prefixed.safetensors", "single_file", base=base,
                               options={"key_prefix": "unet."})
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight)


PLUGIN = '''
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from dmm.schema import setting
from dmm.teachers.formats import TEACHER_FORMATS, read_unet_config, unet_folder


@dataclass(frozen=True)
class ScaledOptions:
    scale: float = setting(1.0, help="multiply every weight by this", gt=0)


@TEACHER_FORMATS.register("myformat", description="diffusers-layout weights in a .mine file, scaled",
                          options=ScaledOptions)
def load_mine(path, *, base, allow_pickle, options):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(read_unet_config(unet_folder(base)))
    unet.load_state_dict({k: v * options.scale for k, v in load_file(str(path)).items()})
    return unet
'''


def test_a_plugin_format_loads_a_teacher_through_the_pool(base, tmp_path):
    from diffusers import UNet2DConditionModel

    from dmm.recipes import TeacherSpec
    from dmm.registry import load_plugin
    from dmm.teachers import load_teacher

    (tmp_path / "myplugin.py").write_text(PLUGIN)
    load_plugin("myplugin.py", base=tmp_path)
    assert "myformat" in list_formats()
    student_base = UNet2DConditionModel.from_pretrained(base / "unet")
    save_file(student_base.state_dict(), str(tmp_path / "weights.mine"))
    spec = TeacherSpec(name="mine", path=str(tmp_path / "weights.mine"), format="myformat")
    teacher = load_teacher(0, spec, base=str(base), student_base=student_base, dtype="float32",
                           default_prediction_type="epsilon")
    assert torch.equal(teacher.unet.conv_in.weight, student_base.conv_in.weight)
    assert not any(p.requires_grad for p in teacher.unet.parameters())
    scaled = load_teacher_unet(tmp_path / "weights.mine", "myformat", base=base, options={"scale": 2.0})
    assert torch.equal(scaled.conv_in.weight, 2 * student_base.conv_in.weight)
    with pytest.raises(ConfigError, match="scale must be greater than 0"):
        load_teacher_unet(tmp_path / "weights.mine", "myformat", base=base, options={"scale": 0.0})


# ----------------------------------------------------------------- bad teacher files: one clear error
@pytest.fixture(scope="module")
def student_base(base):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(base / "unet")


def _load(base, student_base, path, name="neon", fmt="auto"):
    from dmm.recipes import TeacherSpec
    from dmm.teachers import load_teacher

    return load_teacher(0, TeacherSpec(name=name, path=str(path), format=fmt), base=str(base),
                        student_base=student_base, dtype="float32", default_prediction_type="epsilon")


def _safetensors_bytes(student_base, tmp_path) -> bytes:
    save_file(student_base.state_dict(), str(tmp_path / "good.safetensors"))
    return (tmp_path / "good.safetensors").read_bytes()


@pytest.mark.parametrize("damage, reason", [
    (lambda data: data[: len(data) // 2], "incomplete metadata"),  # truncated download
    (lambda data: b"", "header too small"),  # zero bytes
    (lambda data: b"<html>404 Not Found</html>\n" * 20, "header too large"),  # not safetensors at all
])
def test_unreadable_safetensors_names_teacher_path_and_fix(base, student_base, tmp_path, damage, reason):
    bad = tmp_path / "neon.safetensors"
    bad.write_bytes(damage(_safetensors_bytes(student_base, tmp_path)))
    with pytest.raises(TeacherLoadError) as err:
        _load(base, student_base, bad)
    message = str(err.value)
    assert message.startswith(f"teacher 'neon' ({bad}): neon.safetensors is not a readable safetensors file "
                              "(truncated or corrupt: ")
    assert reason in message and message.endswith("re-download or re-export it")
    assert "\n" not in message


def test_truncated_weights_in_a_diffusers_folder(base, student_base, tmp_path):
    folder = make_teacher(base, tmp_path / "neon", seed=3)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(TeacherLoadError, match=rf"^teacher 'neon' \({folder}\): {weights} is not a readable "
                                               r"safetensors file \(truncated or corrupt"):
        _load(base, student_base, folder)


def test_broken_unet_config_json(base, student_base, tmp_path):
    folder = make_teacher(base, tmp_path / "neon", seed=3)
    config = folder / "unet" / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(TeacherLoadError, match=rf"^teacher 'neon' \({folder}\): {config} is not valid JSON "
                                               r"\(.*line \d+ column \d+.*\); restore it"):
        _load(base, student_base, folder)


def test_config_and_weights_disagree(base, student_base, tmp_path):
    folder = make_teacher(base, tmp_path / "neon", seed=3)
    config = folder / "unet" / "config.json"
    raw = json.loads(config.read_text())
    raw["cross_attention_dim"] = raw["cross_attention_dim"] + 32
    config.write_text(json.dumps(raw))
    with pytest.raises(TeacherLoadError, match=rf"^teacher 'neon' \({folder}\): the weights in {folder / 'unet'} "
                                               r"do not fit its config.json: .*attn2.to_k.weight is \(32, 64\) "
                                               r"in the weights, the config wants \(32, 96\)"):
        _load(base, student_base, folder)


def test_single_file_with_a_wrong_shape(base, student_base, tmp_path):
    state = dict(student_base.state_dict())
    state["conv_in.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "neon.safetensors"))
    with pytest.raises(TeacherLoadError, match=r"^teacher 'neon' .*: tensor conv_in.weight has shape \(3, 3\) "
                                               r"but the base UNet's config wants \(16, 4, 3, 3\)"):
        _load(base, student_base, tmp_path / "neon.safetensors")


def test_teacher_of_another_architecture(base, student_base, tmp_path):
    other = tmp_path / "sd15"
    make_tiny_pipeline(other, "sd15")
    with pytest.raises(TeacherLoadError, match=rf"^teacher 'neon' \({other}\): sd15 is an SD1.5 UNet but the "
                                               "recipe's base is SDXL; merge fine-tunes of the base only$"):
        _load(base, student_base, other)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_teacher_weights_are_refused_at_load(base, student_base, tmp_path, bad_value):
    folder = make_teacher(base, tmp_path / "neon", seed=3)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = "mid_block.resnets.0.conv1.weight"
    state[key][0, :2] = bad_value
    save_file(state, str(weights))
    with pytest.raises(TeacherLoadError) as err:
        _load(base, student_base, folder)
    n = state[key][0, :2].numel()
    assert str(err.value) == (
        f"teacher 'neon' ({folder}): non-finite weights, first in {key} ({n} of {state[key].numel()} values "
        "are NaN/inf); the checkpoint is corrupt or was saved after its training diverged: use another "
        "checkpoint of this teacher")
    assert _load(base, student_base, make_teacher(base, tmp_path / "fine", seed=3)).name == "neon"


def test_truncated_pickled_checkpoint(base, student_base, tmp_path):
    torch.save(student_base.state_dict(), tmp_path / "full.ckpt")
    (tmp_path / "neon.ckpt").write_bytes((tmp_path / "full.ckpt").read_bytes()[:4096])
    from dmm.recipes import TeacherSpec
    from dmm.teachers import load_teacher

    spec = TeacherSpec(name="neon", path=str(tmp_path / "neon.ckpt"), allow_pickle=True)
    with pytest.raises(TeacherLoadError, match=rf"^teacher 'neon' \({tmp_path / 'neon.ckpt'}\): neon.ckpt is not a "
                                               r"readable torch checkpoint \(truncated or corrupt: "):
        load_teacher(0, spec, base=str(base), student_base=student_base, dtype="float32",
                     default_prediction_type="epsilon")


def test_broken_scheduler_config_of_a_teacher_folder(base, student_base, tmp_path):
    folder = make_teacher(base, tmp_path / "neon", seed=3)
    (folder / "scheduler" / "scheduler_config.json").write_text("{")
    with pytest.raises(TeacherLoadError, match=rf"^teacher 'neon' \({folder}\): .*scheduler_config.json is not a "
                                               "valid scheduler config"):
        _load(base, student_base, folder)
