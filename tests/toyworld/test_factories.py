"""One tiny-model factory and one test world: the shipped toy UNet is what the factory makes."""
import json

import pytest

from dmm.models.arch import unet_config
from dmm.testing import build_tiny_world, tiny_recipe_dict
from dmm.toyworld import load_world
from dmm.toyworld.build import make_config


def test_factory_reproduces_the_shipped_toy_unet_config():
    from dmm.toyworld.build import _new_unet

    world = load_world()
    shipped = json.loads((world.base_path / "unet" / "config.json").read_text())
    made = dict(_new_unet(make_config("unused", "full", arch=world.arch)).config)
    differ = {k: (v, made.get(k)) for k, v in shipped.items()
              if not k.startswith("_") and json.loads(json.dumps(made.get(k))) != v}
    assert differ == {}


def test_factory_follows_the_arch_map():
    sdxl, sd15 = unet_config("sdxl", text_dim=16, pooled_dim=24), unet_config("sd15", text_dim=16)
    assert sdxl["cross_attention_dim"] == 32 and sd15["cross_attention_dim"] == 16  # 2 encoders vs 1
    assert sdxl["projection_class_embeddings_input_dim"] == 6 * 8 + 24 and "addition_embed_type" not in sd15
    assert sdxl["use_linear_projection"] and not sd15["use_linear_projection"]
    with pytest.raises(ValueError, match="unknown architecture 'sd3'"):
        unet_config("sd3")


def test_tiny_world_is_reused_and_other_settings_are_refused(tmp_path):
    world = build_tiny_world(tmp_path / "w", "sd15", teachers=["x"], n_samples=8, per_shard=4)
    assert list(world.teachers) == ["x"] and len(world.shards) == 2
    stamp = (world.teachers["x"] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = build_tiny_world(tmp_path / "w", "sd15", teachers=["x"], n_samples=8, per_shard=4)
    assert again == world
    assert (world.teachers["x"] / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"other settings.*'arch': \('sd15', 'sdxl'\).*another folder"):
        build_tiny_world(tmp_path / "w", "sdxl", teachers=["x"], n_samples=8, per_shard=4)
    raw = tiny_recipe_dict(world, tmp_path / "run", train={"max_steps": 1}, name="other")
    assert raw["name"] == "other" and raw["train"]["max_steps"] == 1 and raw["train"]["checkpoint_every"] == 2
    assert raw["teachers"] == [{"name": "x", "path": str(world.teachers["x"])}]
