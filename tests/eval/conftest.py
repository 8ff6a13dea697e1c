"""Tiny real models for the evaluation tests (random weights, real diffusers/transformers classes)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch

STYLES = ["red_style", "blue_style"]
WORLD = Path(os.environ.get("DMM_EVAL_TOYWORLD", Path(__file__).resolve().parents[2] / "assets" / "toyworld"))


@pytest.fixture(scope="session")
def world():
    """The shipped toy world (or $DMM_EVAL_TOYWORLD); the test is skipped with the reason when it is not built."""
    try:
        from dmm.toyworld import load_world

        return load_world(WORLD)
    except Exception as exc:  # not built yet, or half built
        pytest.skip(f"toy world not available at {WORLD}: {exc}")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random CLIPModel folder (32 px images) with a real CLIPTokenizer and image processor config."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from dmm.testing import write_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    write_tokenizer(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24,
        logit_scale_init_value=3.0,
    )
    CLIPModel(cfg).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}))
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """A tiny SD1.5-shaped base, two perturbed teachers and a merged model with a StyleUNet."""
    from diffusers import UNet2DConditionModel

    from dmm.models.student import StyleUNet2DConditionModel
    from dmm.testing import make_teacher, make_tiny_pipeline
    from dmm.train.export import export_merged

    root = tmp_path_factory.mktemp("models")
    make_tiny_pipeline(root / "base", arch="sd15", seed=0)
    teachers = {s: str(make_teacher(root / "base", root / f"teacher_{s}", seed=k + 1, scale=0.05))
                for k, s in enumerate(STYLES)}
    base_unet = UNet2DConditionModel.from_pretrained(str(root / "base" / "unet"), local_files_only=True)
    student = StyleUNet2DConditionModel.from_unet(base_unet, STYLES)
    with torch.no_grad():  # a "trained" codebook: the last layer starts at zero, so styles would coincide
        torch.manual_seed(0)
        student.class_embedding.mlp[2].weight.normal_(0, 0.5)
    export_merged(student, root / "base", root / "merged")
    return {"root": root, "base": str(root / "base"), "teachers": teachers, "merged": str(root / "merged"),
            "styles": list(STYLES)}
