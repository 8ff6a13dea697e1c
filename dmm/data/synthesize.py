"""The teachers' own images for the synthesized-data stage (paper: "to compensate for regions of low
data density at small timesteps, we use teacher models to synthesize a small number (hundreds) of
images and fine-tune the model"; 1.5k per teacher).

    python -m dmm.data.synthesize --recipe R [--out DIR] [--per-teacher K] [--prompts FILE]
                                  [--steps S --guidance G --seed N] [--set key=value ...]
    torchrun --nproc_per_node N -m dmm.data.synthesize --recipe R ...

The synthesized stage of a recipe (`data.synthesized`) runs this itself, with the teachers its
ranks loaded for training, whenever its folder is incomplete; the command makes the folder ahead
(e.g. on other machines). Settings come from the recipe's `data.synthesized` (of the first stage
that has one); the flags override them (and `--out`/`--per-teacher` are required without one).

Teacher i samples through the base pipeline with its own UNet (and its own text encoders and
prediction type, as `dmm.teachers.load_teacher` gives them). Image k of every teacher uses prompt
k (cycling through the list: a prompt file, else the first distinct captions of the recipe's
shards or toy world) and seed `seed + k`. Images are made in fixed batches of `batch_size`
indices (batched kernels round differently, so a batch is always the same images) and each one is
written atomically to `<out>/.staging/<style>/<index>.png` as soon as it exists: a stopped run
resumes image by image and makes the same bytes. Work is split by teacher: the ranks holding
teacher i (the training layout's, or rank r holding teacher r mod N for the command) take its
batches in turn. Once every image exists the main rank packs each style's shards (atomically),
marks the manifest complete and removes the staging folder. The manifest records what made the
images; a rerun or a training stage with other settings is refused and told what differs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import re
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import torch
import webdataset as wds
from tqdm.auto import tqdm

from dmm.conditioning import FrozenPipeline
from dmm.data.latents import base_configs_hash, first_difference, teacher_fields
from dmm.data.slots import CAPTION_KEY, IMAGE_KEY, MANIFEST, SlotStream, SynthesizedError, read_synthesized
from dmm.data.sources import DATA_SOURCES, source_name, writes_files
from dmm.distributed import agree, all_gather_object
from dmm.distributed.collective import one_line
from dmm.distributed.env import device_for, init_process_group
from dmm.io import atomic_file, atomic_write_bytes, atomic_write_json, make_dir, remove_dir
from dmm.pipeline import with_unet
from dmm.recipes import Recipe, SynthesizedDataConfig, load_recipe, parse_recipe
from dmm.sampling import sample_images
from dmm.schema import ConfigError
from dmm.teachers import Teacher, load_teacher

log = logging.getLogger("dmm.synthesize")

FORMAT = 1
STAGING = ".staging"
STYLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------- settings
def synthesized_recipe(recipe: Recipe) -> Recipe:
    """The recipe (or its first stage) that has `data.synthesized`; the recipe itself if none does."""
    for stage in recipe.stages:
        if stage["data"].get("synthesized") is not None:
            return parse_recipe(stage)
    return recipe


def prompt_list(recipe: Recipe, cfg: SynthesizedDataConfig, rank: int = 0, world_size: int = 1,
                barrier=lambda: None) -> list[str]:
    """The prompt file's lines, or the first `per_teacher` distinct captions of the recipe's other data
    source (rendered where training renders it: a toy world's shards are written once, by rank 0)."""
    if cfg.prompts:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"data.synthesized.prompts: {path} is not a file (one prompt a line)")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise SynthesizedError(f"data.synthesized.prompts: {path} holds no prompt (one prompt a line)")
        return prompts
    data = dataclasses.replace(recipe.data, synthesized=None)
    if not data.shards and data.toyworld is None:
        raise SynthesizedError("data.synthesized.prompts is empty and the recipe has no data.shards or "
                               "data.toyworld to take captions from: give a prompt file (one prompt a line)")
    name = source_name(data)
    wait = writes_files(name) and world_size > 1
    if wait and rank:
        barrier()
    urls = DATA_SOURCES.get(name).obj(data, Path(recipe.train.output_dir).parent / ".shards")
    if wait and not rank:
        barrier()
    return distinct_captions(urls, data.caption_key, cfg.per_teacher)


def distinct_captions(urls: list[str], caption_key: str, count: int) -> list[str]:
    """The first `count` distinct non-empty captions in the shards' own order (captions only; no image decodes)."""
    found: dict[str, None] = {}
    for url in urls:
        for sample in wds.WebDataset([url], shardshuffle=False, empty_check=False, nodesplitter=None,
                                     workersplitter=None):
            raw = sample.get(caption_key)
            if raw is None:
                continue
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            if caption_key == "json":
                text = json.loads(text).get("caption", "")
            if text.strip():
                found[text.strip()] = None
            if len(found) >= count:
                return list(found)
    if not found:
        raise SynthesizedError(f"no {caption_key!r} captions in the recipe's shards {urls[:3]}...: give "
                               "data.synthesized.prompts (a text file, one prompt a line)")
    return list(found)


def manifest_fields(recipe: Recipe, cfg: SynthesizedDataConfig, prompts: list[str]) -> dict:
    """What made the images: a folder whose fields differ is refused (`check_folder`)."""
    models = {"base": {"path": recipe.model.base, "configs_sha256": base_configs_hash(recipe.model.base)},
              "teachers": [teacher_fields(recipe, i) for i in range(len(recipe.teachers))],
              "resolution": recipe.data.resolution}
    return {
        "format": FORMAT,
        "recipe_sha256": hashlib.sha256(json.dumps(models, sort_keys=True).encode()).hexdigest(),
        **models,
        "per_teacher": cfg.per_teacher,
        "seeds": f"{cfg.seed} + image index",
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "batch_size": cfg.batch_size,
        "samples_per_shard": cfg.samples_per_shard,
        "prompts": {"count": len(prompts), "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()},
    }


def check_folder(folder: Path, fields: dict) -> dict | None:
    """The folder's manifest (None: a new folder); one made with other settings is refused."""
    if not (folder / MANIFEST).is_file():
        return None
    manifest = read_synthesized(folder, complete=False)
    found = first_difference(fields, {k: manifest.get(k) for k in fields})
    if found is not None:
        key, ours, theirs = found
        raise SynthesizedError(
            f"data.synthesized.path: {folder} holds images made with other settings: {key} is {theirs!r} there, "
            f"{ours!r} now; use another folder (data.synthesized.path / --out) or delete this one")
    return manifest


def check_styles(names: list[str]) -> None:
    bad = [n for n in names if not STYLE_NAME.match(n)]
    if bad:
        raise SynthesizedError(f"teacher names {bad} cannot name folders of synthesized images: use letters, "
                               "digits, '.', '_' and '-'")


# ----------------------------------------------------------------------------- generation
def batches_of(per_teacher: int, batch_size: int, slot: int, count: int) -> list[list[int]]:
    """Image indices of the batches a rank makes: batch b (indices b*B..) goes to holder b mod count."""
    starts = range(0, per_teacher, batch_size)
    return [list(range(s, min(s + batch_size, per_teacher))) for b, s in enumerate(starts) if b % count == slot]


def staged(folder: Path, style: str, index: int) -> Path:
    return folder / STAGING / style / f"{index:06d}.{IMAGE_KEY}"


def teacher_pipeline(base_pipe, teacher: Teacher):
    """The base pipeline with the teacher's UNet, own text encoders and prediction type."""
    pipe = with_unet(base_pipe, teacher.unet)
    own = {k: m for k, m in (("text_encoder", teacher.text_encoder), ("text_encoder_2", teacher.text_encoder_2))
           if m is not None}
    if own:
        pipe.register_modules(**own)
    if teacher.prediction_type != pipe.scheduler.config.prediction_type:
        pipe.register_modules(scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                                         prediction_type=teacher.prediction_type))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_images(pipe, folder: Path, style: str, batches: list[list[int]], prompts: list[str],
                cfg: SynthesizedDataConfig, resolution: int, bar, budget: list[int] | None) -> bool:
    """Make and stage every image of `batches` not staged yet; False if `budget` (images left, tests'
    stand-in for a kill) ran out first."""
    dtype = next(pipe.unet.parameters()).dtype
    device = next(pipe.unet.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    for batch in batches:
        missing = [k for k in batch if not staged(folder, style, k).is_file()]
        if not missing:
            continue
        with autocast:  # a bf16 teacher in the float32 base pipeline
            images = sample_images(pipe, [prompts[k % len(prompts)] for k in batch], [cfg.seed + k for k in batch],
                                   steps=cfg.steps, guidance_scale=cfg.guidance_scale, batch_size=len(batch),
                                   height=resolution, width=resolution)
        for k, image in zip(batch, images):
            if k not in missing:
                continue
            if budget is not None:
                if budget[0] <= 0:
                    return False
                budget[0] -= 1
            atomic_write_bytes(staged(folder, style, k), _png(image))
            bar.update(1)
    return True


def pack_style(folder: Path, style: str, prompts: list[str], cfg: SynthesizedDataConfig) -> list[str]:
    """A style's staged images as webdataset shards (each written atomically; the same bytes every time)."""
    names = []
    for n, start in enumerate(range(0, cfg.per_teacher, cfg.samples_per_shard)):
        name = f"{style}/shard-{n:06d}.tar"
        with atomic_file(folder / name) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for k in range(start, min(start + cfg.samples_per_shard, cfg.per_teacher)):
                image = staged(folder, style, k).read_bytes()
                caption = prompts[k % len(prompts)].encode("utf-8")
                for ext, data in ((IMAGE_KEY, image), (CAPTION_KEY, caption)):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        names.append(name)
    return names


def synthesize(recipe: Recipe, cfg: SynthesizedDataConfig, teacher: Callable[[int], Teacher], base_pipe,
               holders: dict[int, list[int]], *, rank: int = 0, world_size: int = 1, barrier=lambda: None,
               progress: bool = True, max_new_images: int | None = None) -> dict | None:
    """Make (or finish) the folder `cfg.path`; returns its complete manifest (None if `max_new_images`
    stopped it early). `teacher(i)` gives teacher i (loaded or held) on the ranks `holders[i]` lists."""
    folder = Path(cfg.path)
    names = recipe.style_names
    collective = world_size > 1
    check_styles(names)
    unheld = [names[i] for i in range(len(names)) if not holders.get(i)]
    if unheld:
        raise SynthesizedError(f"no rank holds teachers {unheld}: every teacher must make its own images")
    prompts = agree(prompt_list, recipe, cfg, rank, world_size, barrier, what="reading the prompts",
                    collective=collective)
    fields = manifest_fields(recipe, cfg, prompts)

    def start():
        manifest = check_folder(folder, fields)
        if manifest is None and not rank:
            make_dir(folder)
            atomic_write_json(folder / MANIFEST, {**fields, "complete": False})
        return manifest is not None and bool(manifest.get("complete"))

    if agree(start, what="checking the synthesized folder", collective=collective):
        if not rank:
            remove_dir(folder / STAGING)  # a run stopped between marking complete and this
        return read_synthesized(folder)
    mine = {i: batches_of(cfg.per_teacher, cfg.batch_size, r.index(rank), len(r))
            for i, r in sorted(holders.items()) if rank in r}
    total = sum(len(b) for bs in mine.values() for b in bs)
    budget = None if max_new_images is None else [max_new_images]

    def generate():
        done = True
        desc = f"synthesize r{rank}" if collective else "synthesize"
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar, \
                torch.random.fork_rng(devices=[]):  # training's random state is left as it was
            for i, batches in mine.items():
                left = [b for b in batches if not all(staged(folder, names[i], k).is_file() for k in b)]
                bar.update(sum(len(b) for b in batches) - sum(len(b) for b in left))
                if not left:
                    continue
                done = make_images(teacher_pipeline(base_pipe, teacher(i)), folder, names[i], left, prompts, cfg,
                                   recipe.data.resolution, bar, budget) and done
                if not done:
                    break
        return done

    done = agree(generate, what="generating images", collective=collective)  # also the barrier before packing
    if collective:
        done = all(all_gather_object(done))
    if not done:
        return None

    def pack():  # the main rank, once every image of every style is staged
        if rank:
            return
        styles = {name: {"images": cfg.per_teacher, "shards": pack_style(folder, name, prompts, cfg)}
                  for name in names}
        atomic_write_json(folder / MANIFEST, {**fields, "complete": True, "styles": styles})
        remove_dir(folder / STAGING)

    agree(pack, what="packing the synthesized shards", collective=collective)
    return read_synthesized(folder)


# ----------------------------------------------------------------------------- training
def synthesized_stream(recipe: Recipe, engine, base_pipe, teachers: dict[int, Teacher], layout,
                       micro_groups: list[dict[int, list[int]]]) -> SlotStream:
    """The trainer's stream for `data.synthesized`: the folder is made (or finished) first with the
    teachers the ranks hold for training, then every local slot reads its own style's shards."""
    cfg = recipe.data.synthesized
    n = len(recipe.teachers)
    slots = sorted({i for groups in micro_groups for i, js in groups.items() if js})
    if any(i >= n for i in slots):
        raise SynthesizedError(f"data.synthesized gives each teacher's images; objective {recipe.objective.name!r} "
                               f"also supervises slots {[i for i in slots if i >= n]} that have no teacher: "
                               "train it on data.shards or data.toyworld")
    w = engine.world_size
    holders = {i: [r for r in range(w) if i in layout.teachers_for_rank(r)] for i in range(n)}
    synthesize(recipe, cfg, lambda i: teachers[i], base_pipe, holders, rank=engine.rank, world_size=w,
               barrier=engine.barrier, progress=engine.is_main)
    manifest = read_synthesized(cfg.path)
    folder = Path(cfg.path)
    style_urls = {i: [str(folder / s) for s in manifest["styles"][name]["shards"]]
                  for i, name in enumerate(recipe.style_names)}
    d = recipe.data
    return SlotStream([u for urls in style_urls.values() for u in urls], batch_size=d.batch_size,
                      resolution=d.resolution, seed=recipe.train.seed, image_key=IMAGE_KEY, caption_key=CAPTION_KEY,
                      shuffle_buffer=d.shuffle_buffer, num_workers=d.num_workers, micro_groups=micro_groups,
                      slots={i: (style_urls[i], holders[i].index(engine.rank), len(holders[i])) for i in slots})



# ----------------------------------------------------------------------------- command
def command_holders(world_size: int, n: int) -> dict[int, list[int]]:
    """The command's split: rank r holds teacher r mod N (ranks holding the same teacher take its batches
    in turn); with fewer ranks than teachers rank r holds teachers r, r + W, ... one after the other."""
    if world_size >= n:
        return {i: [r for r in range(world_size) if r % n == i] for i in range(n)}
    return {i: [i % world_size] for i in range(n)}


def command_settings(recipe: Recipe, args) -> SynthesizedDataConfig:
    """The recipe's `data.synthesized` with the command's flags on top."""
    cfg = recipe.data.synthesized
    if cfg is None:
        missing = [flag for flag, value in (("--out", args.out), ("--per-teacher", args.per_teacher)) if value is None]
        if missing:
            raise ConfigError(f"the recipe has no data.synthesized section: give {' and '.join(missing)}")
        cfg = SynthesizedDataConfig()
    flags = {"path": args.out, "per_teacher": args.per_teacher, "prompts": args.prompts, "steps": args.steps,
             "guidance_scale": args.guidance, "seed": args.seed, "batch_size": args.batch_size}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    for key in ("per_teacher", "steps", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1")
    if cfg.guidance_scale < 0:
        raise ConfigError("--guidance must be >= 0")
    return cfg


def generate_for(recipe: Recipe, cfg: SynthesizedDataConfig, *, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1, max_new_images: int | None = None) -> dict | None:
    """The command's run: this rank loads its teachers one after the other and makes their images."""
    base = FrozenPipeline(recipe.model.base, resolution=recipe.data.resolution).to(device)

    def teacher(i: int) -> Teacher:
        t = load_teacher(i, recipe.teachers[i], base=recipe.model.base, student_base=base.unet,
                         dtype=recipe.model.teacher_dtype, default_prediction_type=base.prediction_type)
        for module in (t.unet, t.text_encoder, t.text_encoder_2):
            if module is not None:
                module.to(device)
        return t

    barrier = torch.distributed.barrier if world_size > 1 else (lambda: None)
    return synthesize(recipe, cfg, teacher, base.pipe, command_holders(world_size, len(recipe.teachers)),
                      rank=rank, world_size=world_size, barrier=barrier, progress=True,
                      max_new_images=max_new_images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmm.data.synthesize",
                                     description="Each teacher of a recipe generates its own images into webdataset "
                                                 "shards per style (the synthesized-data stage's data).")
    parser.add_argument("--recipe", required=True, help="the recipe (its first stage with data.synthesized, if any)")
    parser.add_argument("--out", help="output folder (default: data.synthesized.path); resumed if it holds a run "
                                      "with the same settings")
    parser.add_argument("--per-teacher", type=int, help="images per teacher (paper: 1500)")
    parser.add_argument("--prompts", help="text file of prompts, one a line (default: the recipe data's captions)")
    parser.add_argument("--steps", type=int, help="sampler steps")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, help="image k uses seed + k")
    parser.add_argument("--batch-size", type=int, help="images per pipeline call (fixed for a folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        recipe = synthesized_recipe(load_recipe(args.recipe, args.overrides))
        cfg = command_settings(recipe, args)
        info = init_process_group()
        with contextlib.ExitStack() as group:
            if info.distributed:
                group.callback(torch.distributed.destroy_process_group)
            manifest = generate_for(recipe, cfg, device=device_for(info), rank=info.rank, world_size=info.world_size)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    if manifest is not None and info.rank == 0:
        print(f"synthesize: {cfg.per_teacher} images x {len(manifest['styles'])} teachers -> {cfg.path}")
    return 0


__all__ = ["command_holders", "main", "synthesize", "synthesized_stream"]


if __name__ == "__main__":
    sys.exit(main())
