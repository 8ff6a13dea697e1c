"""CLIP score, PickScore and the LAION aesthetic MLP on tiny random models, against hand computations."""

import numpy as np
import pytest
import torch

from eval.scores import (
    AestheticMLP,
    BackendUnavailable,
    HFClipEmbedder,
    OpenClipEmbedder,
    aesthetic_score,
    build_embedder,
    clip_score,
    load_aesthetic_mlp,
    pick_score,
)

PROMPTS = ["a red circle", "a blue square on the left", "small green triangle"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _hand_embeddings(folder, images, prompts):
    """Independent path: quantise to 8 bit, normalise by hand, run the towers and projections."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    pix = ((images * 255).round() / 255 - MEAN) / STD  # 32 px images: resize and crop are identities
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        t = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        txt = model.text_projection(model.text_model(input_ids=t["input_ids"],
                                                     attention_mask=t["attention_mask"]).pooler_output)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return img, txt, float(model.logit_scale.exp())


def test_clip_score_matches_hand_computation(tiny_clip_dir):
    images = _images()
    emb = HFClipEmbedder(tiny_clip_dir)
    res = clip_score(emb, images, PROMPTS)
    img, txt, _ = _hand_embeddings(tiny_clip_dir, images, PROMPTS)
    per = 100 * (img * txt).sum(-1)
    np.testing.assert_allclose(res.per_image, per.numpy(), rtol=1e-4, atol=1e-4)
    assert res.mean == pytest.approx(max(float(per.mean()), 0.0), abs=1e-4)
    assert str(tiny_clip_dir.resolve()) in res.backbone
    # a different image set gives a different score (the test can fail)
    assert clip_score(emb, _images(seed=5), PROMPTS).per_image != res.per_image


def test_pick_score_matches_hand_computation(tiny_clip_dir):
    images = _images(seed=1)
    emb = build_embedder(str(tiny_clip_dir), processor=str(tiny_clip_dir))
    res = pick_score(emb, images, PROMPTS)
    img, txt, scale = _hand_embeddings(tiny_clip_dir, images, PROMPTS)
    assert scale == pytest.approx(np.exp(3.0), rel=1e-5)
    per = scale * (img * txt).sum(-1)
    np.testing.assert_allclose(res.per_image, per.numpy(), rtol=1e-4, atol=1e-3)
    assert res.mean == pytest.approx(float(per.mean()), abs=1e-3)


def test_scores_reject_mismatched_inputs(tiny_clip_dir):
    emb = HFClipEmbedder(tiny_clip_dir)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        clip_score(emb, _images(), PROMPTS[:2])


def test_missing_clip_folder_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="--clip-model"):
        HFClipEmbedder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="--pick-model"):
        build_embedder(str(tmp_path), setting="--pick-model")


AESTHETIC_SHAPES = {
    "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
    "layers.4.weight": (64, 128), "layers.4.bias": (64,),
    "layers.6.weight": (16, 64), "layers.6.bias": (16,),
    "layers.7.weight": (1, 16), "layers.7.bias": (1,),
}


def test_aesthetic_mlp_keys_and_loading(tmp_path):
    assert {k: tuple(v.shape) for k, v in AestheticMLP().state_dict().items()} == AESTHETIC_SHAPES
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in AESTHETIC_SHAPES.items()}
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    mlp = load_aesthetic_mlp(path)
    emb = torch.nn.functional.normalize(torch.randn(4, 768, generator=g), dim=-1)
    x = emb
    for i in (0, 2, 4, 6, 7):  # no activations: a chain of affine maps (dropout off in eval)
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(mlp(emb), x, rtol=1e-5, atol=1e-6)
    bad = dict(state)
    bad["layers.1.weight"] = bad.pop("layers.2.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a LAION aesthetic v2 state_dict"):
        load_aesthetic_mlp(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="--aesthetic-weights"):
        load_aesthetic_mlp(tmp_path / "missing.pth")


def test_aesthetic_score_on_clip_embeddings(tiny_clip_dir):
    emb = HFClipEmbedder(tiny_clip_dir)
    torch.manual_seed(0)
    mlp = AestheticMLP(dim=24).eval()  # the tiny CLIP projects to 24-d
    images = _images(n=2, seed=3)
    res = aesthetic_score(emb, mlp, images)
    img, _, _ = _hand_embeddings(tiny_clip_dir, images, PROMPTS[:2])
    np.testing.assert_allclose(res.per_image, mlp(img).squeeze(-1).detach().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="768-d embeddings"):
        aesthetic_score(emb, AestheticMLP(), images)


def test_open_clip_backend_is_optional():
    try:
        import open_clip  # noqa: F401
    except Exception:
        with pytest.raises(BackendUnavailable, match="openclip"):
            OpenClipEmbedder("ViT-L-14", "/nonexistent.bin")
        with pytest.raises(BackendUnavailable):
            build_embedder("open_clip:ViT-L-14:/nonexistent.bin")
    else:
        pytest.skip("open_clip is installed here: the unavailable-backend path cannot be exercised")
