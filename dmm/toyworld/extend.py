"""Add teachers of new styles to a built toy world, keeping what it has.

    python -m dmm.toyworld.extend assets/toyworld --styles hatched,sepia [--jobs 2] [--cache DIR]

The new teachers come from the world's own base, tokenizer, CLIP and VAE, trained by the build's
own stages (`build.stage_data`, `stage_cond`, `stage_teacher`, `stage_classifier`, unchanged) at
the world's recorded build settings: the world's pieces stand in for the build's stages of the same
name, so a new teacher is what a build of all the styles would have trained for it (same seeds by
style index). The classifier is fine-tuned from the world's one with its style head grown by the
new classes (old rows kept; old class indices unchanged) on rendered images of every style (the
old ones rehearsed), VAE round trips and a few samples of every teacher. Every teacher, old and
new, is judged on the world's held-out eval prompts and seeds by the classifier before and after.

Stages are cached (an interrupted run resumes); the extended world is written as a copy beside the
old one and moved into place, so a crash leaves the old world as it was. world.json gains the
styles, teacher paths, the new metrics and an `extensions` record (command, settings, timings).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

from dmm.io import atomic_write_text, replace_dir

from .build import (
    BuildConfig,
    Stages,
    _dir_bytes,
    _jsonable,
    _load_tensors,
    _sample_report,
    _sample_seeds,
    load_plugins,
    run_stages,
    save_pipeline,
)
from .models import ClipConfig, UNetConfig
from .styles import list_styles
from .world import WORLD_JSON, WorldNotFoundError, load_world

# build stages whose outputs the world already holds (its folders stand in for them)
FROM_WORLD = ("tokenizer", "clip", "vae", "base")


class ExtendError(ValueError):
    """A world or style list that cannot be extended; the message names the problem and the fix."""


def check_extension(world_root: str | os.PathLike, styles: list[str] | str) -> tuple:
    """(world, new styles) after the refusals: not a toy world, a style it has, an unregistered style."""
    try:
        world = load_world(world_root)
    except WorldNotFoundError as e:
        raise ExtendError(f"cannot extend {world_root}: not a toy world ({e})") from e
    names = [n.strip() for n in styles.split(",")] if isinstance(styles, str) else list(styles)
    names = [n for n in names if n]
    if not names or len(set(names)) != len(names):
        raise ExtendError(f"--styles must name new styles once each, got {names}")
    have = [n for n in names if n in world.style_names]
    if have:
        raise ExtendError(f"the world at {world.root} already has {have} (its styles: {world.style_names}); "
                          "name only styles it does not have")
    unknown = [n for n in names if n not in list_styles()]
    if unknown:
        raise ExtendError(f"unknown style(s) {unknown}; registered: {list_styles()} "
                          "(register more with --plugin, see dmm/toyworld/styles.py)")
    if "build" not in world.meta or "config" not in world.meta["build"]:
        raise ExtendError(f"{world.root / WORLD_JSON} has no build settings (build.config); rebuild the world "
                          "with python -m dmm.toyworld.build")
    return world, names


def extension_config(world, new: list[str], **overrides) -> BuildConfig:
    """The world's recorded build settings, with the new styles appended."""
    rec = dict(world.meta["build"]["config"])
    rec["clip"] = ClipConfig(**rec["clip"])
    rec["unet"] = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in rec["unet"].items()})
    known = {f.name for f in fields(BuildConfig)}
    cfg = BuildConfig(**{k: v for k, v in rec.items() if k in known})
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(cfg, out=str(world.root), styles=list(world.style_names) + list(new), **overrides)


class ExtendStages(Stages):
    """The build's stages over all styles, with the world's folders as the tokenizer, CLIP, VAE and base
    stages, and three stages of its own: samples of the old teachers, the grown classifier, the report."""

    def __init__(self, cfg: BuildConfig, cache: Path, world):
        super().__init__(cfg, cache)
        self.world, self.old = world, list(world.style_names)
        for st in self.old:
            self.graph[f"teacher_{st}"] = replace(self.graph[f"teacher_{st}"], fn=stage_old_teacher_samples)
        self.graph["classifier_render"] = replace(self.graph["classifier_render"], fn=stage_grow_classifier,
                                                  needs=())
        self.graph["report"] = replace(self.graph["report"], fn=stage_extension_report)

    def dir(self, name: str) -> Path:
        w = self.world
        return {"tokenizer": w.tokenizer_path, "clip": w.clip_path, "vae": w.base_path / "vae",
                "base": w.base_path}.get(name) or super().dir(name)

    def done(self, name: str) -> dict | None:
        if name in FROM_WORLD:
            return {"stage": name, "wall_s": 0.0, "metrics": {}, "from_world": str(self.dir(name))}
        return super().done(name)

    # the world stores fp16 weights: train and sample in fp32, as the build does
    def vae(self):
        import torch
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(str(self.dir("vae")), torch_dtype=torch.float32,
                                             local_files_only=True).eval()

    def unet(self, name: str):
        import torch
        from diffusers import UNet2DConditionModel

        if name in self.old:  # an old teacher, from the world
            folder = self.world.teacher_path(name)
        else:
            folder = self.dir(name)
        return UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32,
                                                    local_files_only=True).eval()


def stage_old_teacher_samples(s: ExtendStages, out: Path, style: str) -> dict:
    """A world teacher's samples (eval + classifier training), generated as the build's teacher stage does."""
    from .build import _generate_sets

    _generate_sets(s, s.unet(style), out, with_train=True)
    return {"from_world": str(s.world.teacher_path(style))}


def stage_grow_classifier(s: ExtendStages, out: Path) -> dict:
    """The world's classifier with the new styles appended to its style head (old rows copied)."""
    import torch

    from .classifier import ClassifierConfig, ToyClassifier

    old = ToyClassifier.load(s.world.classifier_path)
    if old.config.heads["style"] != s.old:
        raise ExtendError(f"the classifier at {s.world.classifier_path} knows styles {old.config.heads['style']}, "
                          f"the world {s.old}; rebuild the world")
    conf = asdict(old.config)
    conf["styles"] = list(s.cfg.styles)
    conf["heads"] = {**conf["heads"], "style": list(s.cfg.styles)}
    torch.manual_seed(s.cfg.seed + 7)
    model = ToyClassifier(ClassifierConfig(**conf))
    state = model.state_dict()
    for k, v in old.state_dict().items():
        if k.startswith("heads.style."):
            state[k][: len(v)] = v
        else:
            state[k] = v
    model.load_state_dict(state)
    model.save(out)
    return {"grown_from": s.old, "new_classes": [st for st in s.cfg.styles if st not in s.old]}


def stage_extension_report(s: ExtendStages, out: Path) -> dict:
    """Every teacher judged by the fine-tuned classifier (and the old ones by the world's classifier too)."""
    from .classifier import ToyClassifier
    from .content import sample_contents

    cfg = s.cfg
    contents = sample_contents(cfg.eval_samples, _sample_seeds(cfg)["eval_prompts"])
    final = ToyClassifier.load(s.dir("classifier"))
    before = ToyClassifier.load(s.world.classifier_path)
    previous = s.world.meta.get("metrics", {}).get("teachers", {})
    teachers = {}
    for k, st in enumerate(cfg.styles):
        imgs = _load_tensors(s.dir(f"teacher_{st}") / "samples.safetensors")["eval"]
        rep = _sample_report(final, imgs, contents, k, cfg.styles)
        if st in s.old:
            rep["own_style_accuracy_previous_classifier"] = _sample_report(before, imgs, contents, k,
                                                                           s.old)["own_style_accuracy"]
            if "own_style_accuracy_render_only_classifier" in previous.get(st, {}):
                rep["own_style_accuracy_render_only_classifier"] = \
                    previous[st]["own_style_accuracy_render_only_classifier"]
        teachers[st] = rep
    base = _sample_report(final, _load_tensors(s.dir("base_samples") / "samples.safetensors")["eval"], contents,
                          None, cfg.styles)
    return {"teachers": teachers, "base": base}


def default_extension_cache(world, cfg: BuildConfig) -> Path:
    """Per world (its base weights' hash) and style list, so another world never reuses these stages."""
    h = hashlib.sha1()
    for f in sorted((world.base_path / "unet").glob("*.safetensors")):
        h.update(f.read_bytes())
    return Path(".cache") / "toyworld" / f"extend-{h.hexdigest()[:10]}-{'_'.join(cfg.styles)}"


def extend_world(world_root: str | os.PathLike, styles: list[str] | str, *, jobs: int | None = None,
                 cache: str | os.PathLike | None = None, progress: bool | None = None,
                 plugins: list[str] | None = None, command: str = "") -> dict:
    """Train teachers of `styles` into the world at `world_root` and grow its classifier; returns the
    extension record written to world.json (`extensions[-1]`)."""
    import torch

    if plugins:
        load_plugins(plugins)
    world, new = check_extension(world_root, styles)
    cfg = extension_config(world, new, jobs=jobs, progress=progress, plugins=plugins)
    torch.set_num_threads(cfg.threads)
    stages = ExtendStages(cfg, (Path(cache) if cache else default_extension_cache(world, cfg)).resolve(), world)
    stages.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    records = run_stages(stages)
    wall = time.time() - t0
    report = records["report"]["metrics"]
    # an old teacher's stage only samples it: named samples_<style> here
    ran = {(f"samples_{k[len('teacher_'):]}" if k[len("teacher_"):] in stages.old else k): v["wall_s"]
           for k, v in records.items() if "from_world" not in v}
    record = {
        "command": command, "styles": new, "previous_styles": stages.old,
        "classifier_own_style_accuracy": {
            "before": {st: r["own_style_accuracy_previous_classifier"] for st, r in report["teachers"].items()
                       if st in stages.old},
            "after": {st: r["own_style_accuracy"] for st, r in report["teachers"].items()}},
        "classifier_render_test_accuracy": records["classifier"]["metrics"]["render_test_accuracy"],
        "timings_s": {**ran, "sum_of_stages": round(sum(ran.values()), 1),
                      "this_run_wall_before_assembly": round(wall, 1)},
        "config": _jsonable(asdict(cfg)),
    }
    _assemble(stages, report, record)
    if cfg.progress:
        print(f"toy world {world.root} extended by {new} in {time.time() - t0:.0f}s", file=sys.stderr)
    return record


def _assemble(s: ExtendStages, report: dict, record: dict) -> None:
    """A copy of the world with the new teachers, the new classifier and world.json, moved into place."""
    root = s.world.root
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.extend"))
    try:
        shutil.copytree(root, tmp, dirs_exist_ok=True)
        meta = json.loads((root / WORLD_JSON).read_text())
        for st in record["styles"]:
            rel = f"teachers/{st}"
            save_pipeline(s, f"teacher_{st}", tmp / rel)
            meta["paths"]["teachers"][st] = rel
        shutil.rmtree(tmp / meta["paths"]["classifier"])
        shutil.copytree(s.dir("classifier"), tmp / meta["paths"]["classifier"],
                        ignore=shutil.ignore_patterns("done.json"))
        meta["styles"] = list(s.cfg.styles)
        meta["registered_styles"] = list_styles()
        m = meta["metrics"]
        m["classifier_render_test_accuracy"] = record["classifier_render_test_accuracy"]
        m["own_style_accuracy"] = {st: r["own_style_accuracy"] for st, r in report["teachers"].items()}
        m["teachers"], m["base"] = report["teachers"], report["base"]
        meta["timings_s"].update({k: v for k, v in record["timings_s"].items() if k.startswith("teacher_")
                                  and k[len("teacher_"):] in record["styles"]})
        meta["sizes"]["asset_bytes"] = _dir_bytes(tmp)
        record["teacher_bytes"] = {st: _dir_bytes(tmp / "teachers" / st) for st in record["styles"]}
        meta.setdefault("extensions", []).append(record)
        atomic_write_text(tmp / WORLD_JSON, json.dumps(meta, indent=1))
        replace_dir(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


__all__ = ["ExtendError", "ExtendStages", "check_extension", "extend_world", "extension_config"]


def main(argv: list[str] | None = None) -> Path:
    """The command line; its own module so that the build (which the extension reuses) never imports it."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dmm.toyworld.extend",
                                description="add teachers of new registered styles to a built toy world, from its "
                                            "own base at its recorded settings, and grow its classifier")
    p.add_argument("world", help="the built toy world folder (e.g. assets/toyworld)")
    p.add_argument("--styles", required=True, help="the new styles, comma-separated, e.g. hatched,sepia")
    p.add_argument("--jobs", type=int, default=None, help="parallel processes for independent stages")
    p.add_argument("--cache", default=None, help="stage cache folder (an interrupted run resumes from it)")
    p.add_argument("--plugin", action="append", default=None, metavar="MODULE_OR_FILE.py",
                   help="a module or .py file that registers styles (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = "python -m dmm.toyworld.extend " + " ".join(argv if argv is not None else sys.argv[1:])
    rec = extend_world(a.world, a.styles, jobs=a.jobs, cache=a.cache, progress=False if a.no_progress else None,
                       plugins=a.plugin, command=command)
    print(f"own-style accuracy after: {rec['classifier_own_style_accuracy']['after']} "
          f"(old teachers before: {rec['classifier_own_style_accuracy']['before']})", file=sys.stderr)
    return Path(a.world)


if __name__ == "__main__":
    main()
