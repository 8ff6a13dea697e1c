import pytest
import torch
from diffusers import UNet2DConditionModel

from dmm.models.arch import time_embed_dim
from dmm.models.student import StyleUNet2DConditionModel, resolve_style
from tests.conftest import unet_inputs

STYLES = ["flat", "neon", "pixel"]


def _trained_student(base):
    student = StyleUNet2DConditionModel.from_unet(base, STYLES)
    torch.manual_seed(1)
    for p in student.class_embedding.parameters():  # as if trained: non-zero style vectors
        torch.nn.init.normal_(p, std=0.5)
    return student


def test_untrained_student_equals_base(tiny_unet):
    student = StyleUNet2DConditionModel.from_unet(tiny_unet, STYLES)
    x, t, ehs, kw = unet_inputs(tiny_unet)
    out = student(x, t, ehs, class_labels=torch.tensor([0, 2]), **kw).sample
    torch.testing.assert_close(out, tiny_unet(x, t, ehs, **kw).sample)


def test_codebook_shape_follows_time_embedding(tiny_unet):
    student = StyleUNet2DConditionModel.from_unet(tiny_unet, STYLES)
    assert student.class_embedding.codebook.weight.shape == (3, time_embed_dim(tiny_unet))
    mlp = student.class_embedding.mlp
    assert [type(m).__name__ for m in mlp] == ["Linear", "SiLU", "Linear"]


def test_round_trip_keeps_styles_and_outputs(tiny_unet, tmp_path):
    student = _trained_student(tiny_unet)
    student.save_pretrained(tmp_path)
    loaded = StyleUNet2DConditionModel.from_pretrained(tmp_path)
    assert loaded.style_names == STYLES
    assert loaded.config.addition_embed_type == tiny_unet.config.addition_embed_type
    x, t, ehs, kw = unet_inputs(tiny_unet)
    labels = torch.tensor([1, 2])
    torch.testing.assert_close(loaded(x, t, ehs, class_labels=labels, **kw).sample,
                               student(x, t, ehs, class_labels=labels, **kw).sample)


def test_styles_change_the_output(tiny_unet):
    student = _trained_student(tiny_unet)
    x, t, ehs, kw = unet_inputs(tiny_unet)
    a = student(x, t, ehs, class_labels=torch.tensor([0, 0]), **kw).sample
    b = student(x, t, ehs, class_labels=torch.tensor([1, 1]), **kw).sample
    assert (a - b).abs().max() > 1e-4


def test_held_style_by_name_index_and_weights_agree(tiny_unet):
    student = _trained_student(tiny_unet)
    x, t, ehs, kw = unet_inputs(tiny_unet)
    ref = student(x, t, ehs, class_labels=torch.tensor([2, 2]), **kw).sample
    for spec in ("pixel", 2, {"pixel": 1.0}, [0.0, 0.0, 1.0]):
        student.set_style(spec)
        torch.testing.assert_close(student(x, t, ehs, **kw).sample, ref)


def test_mixture_interpolates_embeddings_before_mlp(tiny_unet):
    student = _trained_student(tiny_unet)
    cb = student.class_embedding
    w = resolve_style({"flat": 0.25, "neon": 0.75}, STYLES)
    expected = cb.mlp(0.25 * cb.codebook.weight[0] + 0.75 * cb.codebook.weight[1])
    torch.testing.assert_close(cb(w)[0], expected)


def test_no_style_is_a_clear_error(tiny_unet):
    student = _trained_student(tiny_unet)
    x, t, ehs, kw = unet_inputs(tiny_unet)
    with pytest.raises(ValueError, match="set_style"):
        student(x, t, ehs, **kw)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("anime", r"unknown style 'anime'; known styles: \['flat', 'neon', 'pixel'\]"),
        ({"flat": 0.7, "neon": 0.7}, "sum to 1"),
        ({"flat": 1.5, "neon": -0.5}, "non-negative"),
        ([0.5, 0.5], "one value per style"),
        (7, "out of range"),
    ],
)
def test_bad_style_requests(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_style(spec, STYLES)


def test_bake_is_exact_plain_unet(tiny_unet):
    student = _trained_student(tiny_unet)
    plain = student.bake("neon")
    assert type(plain) is UNet2DConditionModel
    x, t, ehs, kw = unet_inputs(tiny_unet)
    torch.testing.assert_close(plain(x, t, ehs, **kw).sample,
                               student(x, t, ehs, class_labels=torch.tensor([1, 1]), **kw).sample,
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- class_labels checked in forward
@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([0, 1, 2]), "got styles for 3 samples but the batch has 2"),
        (torch.tensor([0, 3]), r"style indices must lie in \[0, 3\); this model has styles \['flat', 'neon', 'pixel'\]"),
        (torch.tensor([-1, 0]), r"style indices must lie in \[0, 3\)"),
        (torch.tensor([[0.5, 0.5, 0.0]] * 3), "got styles for 3 samples but the batch has 2"),
        (torch.tensor([[0.5, 0.5]] * 2), r"mixing weights need 3 values \(\['flat', 'neon', 'pixel'\]\), got 2"),
        (torch.tensor([[0.7, 0.7, 0.0]] * 2), "must sum to 1"),
        (torch.tensor([[1.5, -0.5, 0.0]] * 2), "non-negative"),
        (torch.tensor([[float("nan"), 0.5, 0.5]] * 2), "finite"),
        (torch.tensor([[0, 1]]), (r"class_labels must be style indices \(B,\) or mixing weights \(B, 3\), "
                                 r"got torch.int64 of shape \(1, 2\)")),
        (torch.tensor([True, False]), "class_labels must be style indices"),
        (["flat", "anime"], r"unknown style 'anime'; known styles: \['flat', 'neon', 'pixel'\]"),
    ],
)
def test_forward_checks_class_labels_like_set_style(tiny_unet, labels, message):
    student = _trained_student(tiny_unet)
    x, t, ehs, kw = unet_inputs(tiny_unet)
    with pytest.raises(ValueError, match=message):
        student(x, t, ehs, class_labels=labels, **kw)


def test_forward_accepts_every_form_of_class_labels(tiny_unet):
    student = _trained_student(tiny_unet)
    x, t, ehs, kw = unet_inputs(tiny_unet)
    ref = student(x, t, ehs, class_labels=torch.tensor([1, 1]), **kw).sample
    for labels in (torch.tensor([0.0, 1.0, 0.0]), torch.tensor([[0.0, 1.0, 0.0]] * 2), torch.tensor(1),
                   torch.tensor([1], dtype=torch.int32), ["neon", "neon"], "neon"):
        torch.testing.assert_close(student(x, t, ehs, class_labels=labels, **kw).sample, ref)
