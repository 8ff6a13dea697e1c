import pytest
import torch
from safetensors.torch import save_file

from dmm.teachers import list_formats, load_teacher_unet
from dmm.teachers.pool import first_shape_mismatch
from dmm.testing import make_tiny_pipeline


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
    with pytest.raises(ValueError, match="do not match the base UNet"):
        load_teacher_unet(tmp_path / "bad.safetensors", base=base)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher_unet(tmp_path / "missing", base=base)
    with pytest.raises(ValueError, match="unknown teacher format 'gguf'"):
        load_teacher_unet(base, "gguf", base=base)
