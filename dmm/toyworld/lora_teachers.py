"""LoRA teachers of a built toy world (the paper's SD1.5-LoRA setting, in miniature).

    python -m dmm.toyworld.build --lora-teachers --out assets/toyworld [--jobs 2]

Adds `teachers_lora/<style>.safetensors` to an existing world: for each style, a LoRA trained
from the world's base with peft on that style's images only (the full teachers' training loop,
`train.train_unet`, with the adapter's weights as the only trainable parameters), saved by the
pipeline's own `save_lora_weights` in the peft layout diffusers loads (rank and alpha in the
file's metadata, fp16 tensors). Each is judged like the full teachers: the world's classifier on
samples of the base with the LoRA fused (`dmm.teachers.lora.fuse_lora_teacher`), on the world's
held-out eval prompts and seeds. world.json gains `paths.lora_teachers` and
`metrics.lora_teachers`; the rest of the world is left as it is.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

LORA_DIR = "teachers_lora"
ADAPTER = "default"


@dataclass
class LoraTeacherConfig:
    """How the toy LoRA teachers are trained: about a third of a full teacher's compute (200 steps of 16
    images against 250 of 32), on the world's base; accuracies are in world.json."""

    rank: int = 8
    alpha: float = 8.0
    targets: list[str] = field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"])
    steps: int = 200
    lr: float = 3e-3
    batch_size: int = 16
    images: int = 2048  # rendered training images of the style
    seed: int = 0
    eval_samples: int = 64  # the first 64 of the prompts and seeds the full teachers were judged on
    threads: int = 1


def _train_one(world_root: str, style: str, cfg: LoraTeacherConfig, out_file: str) -> dict:
    """Train, save and judge one style's LoRA (runs in a worker process)."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from dmm.io import atomic_file
    from dmm.teachers.lora import fuse_lora_teacher

    from .conditioning import encode_captions
    from .content import all_captions, sample_contents
    from .models import pipeline_class
    from .render import render_arrays
    from .train import encode_latents, generate, to_unit, train_unet
    from .world import load_world

    torch.set_num_threads(cfg.threads)
    world = load_world(world_root)
    k = world.style_names.index(style)
    started = time.time()
    pipe = world.load_pipeline("base")
    table = encode_captions(pipe, all_captions(), world.resolution)
    images, contents, _ = render_arrays(cfg.images, cfg.seed + 7919 * (k + 1), [style])
    latents = encode_latents(pipe.vae, to_unit(images))
    rows = torch.tensor([table.index(c.caption) for c in contents])
    unet = pipe.unet
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.targets, init_lora_weights=True)
    torch.manual_seed(cfg.seed + 10 + k)
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    params = [p for n, p in unet.named_parameters() if ".lora_" in n]
    ema = train_unet(unet, latents, rows, table, cfg.steps, cfg.seed + 10 + k, lr=cfg.lr,
                     warmup=min(20, cfg.steps // 10 + 1), batch_size=cfg.batch_size, ema_decay=0.99,
                     desc=f"lora {style}", progress=False, params=params)
    state = {kk: v.to(torch.float16).contiguous() for kk, v in get_peft_model_state_dict(ema, adapter_name=ADAPTER).items()}
    trained_s = time.time() - started
    out = Path(out_file)
    with atomic_file(out) as tmp:  # save_lora_weights writes into a folder: move its one file into place
        folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.stem}."))
        try:
            pipeline_class(world.arch).save_lora_weights(
                str(folder), unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict(),
                weight_name=out.name)
            os.replace(folder / out.name, tmp)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    # judged like the full teachers: the fused teacher sampled on the world's eval prompts and seeds
    seeds = world.meta["metrics"]["eval_seeds"]
    caps = [c.caption for c in sample_contents(cfg.eval_samples, seeds["eval_prompts"])]
    teacher = world.load_pipeline("base")
    teacher.unet = fuse_lora_teacher(out, world.base_path, 1.0).unet.eval()
    sampling = world.sampling
    imgs = generate(teacher, caps, seeds["eval_noise"], sampling["num_inference_steps"], sampling["guidance_scale"])
    pred = world.classifier.predict(imgs)["style"]
    return {"own_style_accuracy": float((pred == k).float().mean()),
            "full_teacher_own_style_accuracy": world.meta["metrics"]["own_style_accuracy"].get(style),
            "style_histogram": dict(zip(world.style_names, torch.bincount(pred, minlength=len(world.style_names))
                                        .tolist())),
            "lora_params": sum(p.numel() for p in params), "file_bytes": out.stat().st_size,
            "train_s": round(trained_s, 1), "total_s": round(time.time() - started, 1)}


def build_lora_teachers(world_root: str | os.PathLike, cfg: LoraTeacherConfig | None = None, jobs: int = 2,
                        styles: list[str] | None = None, command: str = "") -> dict:
    """Train every style's LoRA teacher (in `jobs` single-thread processes) and record them in world.json."""
    from dmm.io import atomic_write_text

    from .world import WORLD_JSON, load_world

    cfg = cfg or LoraTeacherConfig()
    world = load_world(world_root)
    styles = styles or world.style_names
    folder = world.root / LORA_DIR
    folder.mkdir(exist_ok=True)
    files = {st: folder / f"{st}.safetensors" for st in styles}
    started = time.time()
    if jobs <= 1:
        results = {st: _train_one(str(world.root), st, cfg, str(f)) for st, f in files.items()}
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as ex:
            futures = {st: ex.submit(_train_one, str(world.root), st, cfg, str(f)) for st, f in files.items()}
            results = {st: f.result() for st, f in futures.items()}
    meta = json.loads((world.root / WORLD_JSON).read_text())
    meta["paths"].setdefault("lora_teachers", {}).update({st: f"{LORA_DIR}/{st}.safetensors" for st in styles})
    meta["metrics"].setdefault("lora_teachers", {}).update(results)
    meta.setdefault("lora_build", {}).update({"command": command, "config": asdict(cfg), "jobs": jobs,
                                              "wall_s": round(time.time() - started, 1)})
    atomic_write_text(world.root / WORLD_JSON, json.dumps(meta, indent=1))
    return results


__all__ = ["LORA_DIR", "LoraTeacherConfig", "build_lora_teachers"]
