import json
import shutil

import pytest
import torch
from safetensors import safe_open

from dmm.teachers import fuse_lora_teacher
from dmm.toyworld import load_world
from dmm.toyworld.lora_teachers import LoraTeacherConfig, build_lora_teachers
from dmm.toyworld.world import resolve_world_path


@pytest.mark.slow
def test_lora_teachers_are_added_to_a_built_world(tmp_path):
    """A few steps on a copy of the shipped world: the LoRA file is in the peft layout diffusers
    loads (rank/alpha in its metadata), holds adapter weights only, changes the base when fused,
    and world.json records it without losing anything it had."""
    src = resolve_world_path()
    if not (src / "world.json").is_file():
        pytest.skip(f"no toy world at {src} (python -m dmm.toyworld.build --out assets/toyworld)")
    world_dir = tmp_path / "world"
    shutil.copytree(src, world_dir, ignore=shutil.ignore_patterns("teachers_lora"))
    before = json.loads((world_dir / "world.json").read_text())
    before["paths"].pop("lora_teachers", None)  # the shipped world's own LoRA teachers: not copied
    (world_dir / "world.json").write_text(json.dumps(before))
    cfg = LoraTeacherConfig(steps=2, images=16, batch_size=4, eval_samples=2)
    result = build_lora_teachers(world_dir, cfg, jobs=1, styles=["neon"], command="test")
    file = world_dir / "teachers_lora" / "neon.safetensors"
    with safe_open(str(file), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == cfg.rank
    after = json.loads((world_dir / "world.json").read_text())
    assert after["paths"]["lora_teachers"] == {"neon": "teachers_lora/neon.safetensors"}
    assert after["metrics"]["lora_teachers"]["neon"] == result["neon"]
    assert 0.0 <= result["neon"]["own_style_accuracy"] <= 1.0
    assert {k: v for k, v in after.items() if k not in ("paths", "metrics", "lora_build")} == \
        {k: v for k, v in before.items() if k not in ("paths", "metrics", "lora_build")}
    assert {k: v for k, v in after["paths"].items() if k != "lora_teachers"} == before["paths"]
    world = load_world(world_dir)
    base = world.load_pipeline("base").unet.state_dict()
    fused = fuse_lora_teacher(file, world.base_path, 1.0).unet.state_dict()
    assert any(not torch.equal(base[k], fused[k]) for k in base)
