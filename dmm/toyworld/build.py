"""Build a toy world from a seed: data, tokenizer, CLIP, VAE, base UNet, teachers, classifier, report.

    python -m dmm.toyworld.build --out assets/toyworld [--arch sdxl|sd15] [--styles flat,outline,neon,pixel]
                                 [--scale tiny|full] [--seed 0] [--jobs 2] [--cache DIR] [--plugin my_styles.py]
    python -m dmm.toyworld.extend assets/toyworld --styles hatched,sepia   (adds teachers: extend.py)

Each stage is declared with `@stage(name, needs=(...))`: the stages whose outputs it reads. A
small runner orders them topologically (ties in declaration order) and runs the ones not done yet;
a stage whose inputs have not finished is refused with their names. Every stage writes into a
cache folder (atomically, with a `done.json` marker), so an interrupted build resumes stage by
stage. With `--jobs N`, ready stages run in N single-thread worker processes (on 2 shared cores,
two 1-thread processes beat one 2-thread process); a stage marked `exclusive` (the data-parallel
base) runs alone. The world folder is assembled in a temporary folder and moved into place.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from dmm.io import atomic_save_safetensors, atomic_write_json, atomic_write_text, replace_dir
from dmm.models.arch import get_arch
from dmm.registry import load_plugin

from .content import ATTRIBUTES, all_captions, attribute_values, vocabulary
from .models import ARCHS, ClipConfig, UNetConfig
from .styles import list_styles, parse_styles
from .world import WORLD_JSON


@dataclass
class BuildConfig:
    """Everything a build depends on; `scale` presets fill in the step counts."""

    out: str
    arch: str = "sdxl"
    styles: list[str] = field(default_factory=lambda: parse_styles(None))
    seed: int = 0
    scale: str = "full"
    images_per_style: int = 6000
    clip_steps: int = 1500
    vae_steps: int = 800
    vae_lr: float = 3e-3
    classifier_steps: int = 1000
    classifier_roundtrip: int = 4000  # training images also seen through a VAE round trip
    classifier_ft_steps: int = 500
    teacher_train_samples: int = 64  # per teacher, for the classifier fine-tune (0: off)
    base_steps: int = 1500
    base_lr: float = 1e-3
    teacher_steps: int = 250
    teacher_lr: float = 5e-4
    batch_size: int = 32
    eval_samples: int = 128
    sample_steps: int = 20
    guidance: float = 3.0
    half_precision: bool = True  # UNet/VAE weights stored as fp16 (loaded and run in fp32)
    jobs: int = 2
    threads: int = 1
    progress: bool = True
    plugins: list[str] = field(default_factory=list)  # modules / .py files registering styles (see styles.py)
    clip: ClipConfig = field(default_factory=ClipConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    @property
    def resolution(self) -> int:
        return 32

    @property
    def latent_size(self) -> int:
        return self.resolution // 2


TINY = dict(images_per_style=32, clip_steps=2, vae_steps=2, classifier_steps=2, classifier_roundtrip=16,
            classifier_ft_steps=2, teacher_train_samples=2, base_steps=2, teacher_steps=2, batch_size=8,
            eval_samples=4, sample_steps=2, jobs=1)


def make_config(out: str, scale: str = "full", **overrides) -> BuildConfig:
    if scale not in ("tiny", "full"):
        raise ValueError(f"scale must be tiny or full, got {scale!r}")
    cfg = BuildConfig(out=str(out), scale=scale)
    if scale == "tiny":
        cfg = replace(cfg, **TINY)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "plugins" in overrides:  # before the styles are checked: a plugin may register them
        overrides["plugins"] = [str(Path(p).resolve()) if str(p).endswith(".py") else str(p)
                                for p in overrides["plugins"]]
        load_plugins(overrides["plugins"])
    if "styles" in overrides:
        overrides["styles"] = parse_styles(overrides["styles"])
    if overrides.get("arch", cfg.arch) not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {overrides.get('arch')!r}")
    return replace(cfg, **overrides)


def load_plugins(plugins: list[str]) -> None:
    """Import the user modules that register styles (again in each spawned worker process)."""
    for spec in plugins:
        load_plugin(spec)


def default_cache(cfg: BuildConfig) -> Path:
    return Path(".cache") / "toyworld" / f"{cfg.arch}-{cfg.scale}-s{cfg.seed}-{'_'.join(cfg.styles)}"


# ------------------------------------------------------------------------------------------ plumbing
class StageError(RuntimeError):
    """A stage graph that cannot run: unknown or missing inputs, or a cycle; the message names them."""


@dataclass(frozen=True)
class Stage:
    """One build step: `fn(stages, out_dir)` (`fn(stages, out_dir, style)` for a per-style stage)
    writes its outputs into `out_dir`; `needs` names the stages whose outputs it reads."""

    name: str
    fn: Callable
    needs: tuple[str, ...] = ()
    exclusive: bool = False  # uses every worker itself: runs alone, in the main process
    style: str | None = None

    def call(self, stages: Stages, out: Path) -> dict | None:
        return self.fn(stages, out) if self.style is None else self.fn(stages, out, self.style)


_DECLARED: list[Stage] = []


def stage(name: str, *, needs: tuple[str, ...] = (), exclusive: bool = False):
    """Declare a build stage. A name with `{style}` is one stage per built style; in `needs`,
    `{style}` means that same style in a per-style stage and every built style otherwise."""

    def wrap(fn: Callable) -> Callable:
        _DECLARED.append(Stage(name, fn, tuple(needs), exclusive))
        return fn

    return wrap


def stage_graph(styles: list[str]) -> dict[str, Stage]:
    """The declared stages for these styles, per-style templates expanded, in declaration order."""
    graph: dict[str, Stage] = {}

    def expand(needs: tuple[str, ...], style: str | None) -> tuple[str, ...]:
        out: list[str] = []
        for need in needs:
            if "{style}" not in need:
                out.append(need)
            else:
                out.extend(need.format(style=st) for st in ([style] if style else styles))
        return tuple(out)

    for decl in _DECLARED:
        for st in (styles if "{style}" in decl.name else [None]):
            name = decl.name.format(style=st) if st else decl.name
            graph[name] = replace(decl, name=name, needs=expand(decl.needs, st), style=st)
    return graph


def plan(graph: dict[str, Stage], targets: list[str] | None = None) -> list[str]:
    """Topological order of `targets` and everything they need (default: every stage); among
    stages ready at the same time, declaration order. Unknown names and cycles are errors."""
    for st in graph.values():
        unknown = [n for n in st.needs if n not in graph]
        if unknown:
            raise StageError(f"stage {st.name!r} needs {unknown}, which no stage declares; declared: {list(graph)}")
    wanted: set[str] = set()
    stack = list(graph) if targets is None else list(targets)
    while stack:
        name = stack.pop()
        if name not in graph:
            raise StageError(f"no stage {name!r}; declared: {list(graph)}")
        if name not in wanted:
            wanted.add(name)
            stack.extend(graph[name].needs)
    order: list[str] = []
    while len(order) < len(wanted):
        ready = [n for n in graph if n in wanted and n not in order and all(d in order for d in graph[n].needs)]
        if not ready:
            stuck = sorted(wanted - set(order))
            raise StageError(f"the stages {stuck} need each other (a cycle); fix their needs")
        order.append(ready[0])
    return order


class Stages:
    """Stage outputs in the cache folder; `run` skips a stage whose `done.json` exists."""

    def __init__(self, cfg: BuildConfig, cache: Path):
        self.cfg, self.cache = cfg, Path(cache)
        self.graph = stage_graph(cfg.styles)

    def dir(self, name: str) -> Path:
        return self.cache / name

    def done(self, name: str) -> dict | None:
        marker = self.dir(name) / "done.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def run(self, name: str) -> dict:
        """Run stage `name` unless it is done; its inputs must have finished (else StageError naming them)."""
        record = self.done(name)
        if record is not None:
            return record
        st = self.graph[name]
        missing = [n for n in st.needs if self.done(n) is None]
        if missing:
            raise StageError(f"stage {name!r} needs {missing}, which have not finished in {self.cache}; "
                             "run them first (build() runs every stage in order and resumes)")
        import torch

        torch.set_num_threads(self.cfg.threads)
        tmp = self.cache / f".{name}.tmp{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        t0 = time.time()
        metrics = st.call(self, tmp) or {}
        record = {"stage": name, "wall_s": round(time.time() - t0, 1), "metrics": metrics}
        atomic_write_text(tmp / "done.json", json.dumps(record, indent=1))
        replace_dir(tmp, self.dir(name))
        return record

    # loaders of finished stages
    def tokenizer(self):
        from .tokenizer import load_tokenizer

        return load_tokenizer(self.dir("tokenizer"))

    def data(self) -> dict:
        with np.load(self.dir("data") / "data.npz") as z:
            return {k: z[k] for k in z.files}

    def clip(self):
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(str(self.dir("clip")), local_files_only=True).eval()

    def vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(str(self.dir("vae")), local_files_only=True).eval()

    def text_encoders(self):
        from .models import text_encoders_from_clip

        scale = json.loads((self.dir("cond") / "cond.json").read_text())["pooled_scale"]
        return text_encoders_from_clip(self.clip(), scale)

    def table(self):
        from safetensors.torch import load_file

        from .conditioning import CaptionTable

        t = load_file(str(self.dir("cond") / "table.safetensors"))
        return CaptionTable(all_captions(), t["prompt_embeds"], t.get("pooled"), t.get("time_ids"))

    def latents(self):
        from safetensors.torch import load_file

        return load_file(str(self.dir("cond") / "latents.safetensors"))

    def unet(self, name: str):
        return self.unet_from(self.dir(name))

    @staticmethod
    def unet_from(folder: Path):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(str(Path(folder) / "unet"), local_files_only=True).eval()

    def pipeline(self, unet):
        from .models import make_pipeline

        return make_pipeline(self.cfg.arch, self.tokenizer(), self.text_encoders(), self.vae(), unet)


def _run_in_worker(stages: Stages, name: str) -> dict:
    """Run one stage in a (spawned, single-thread) worker process (`stages` is pickled: a subclass,
    such as the extension's, keeps its own graph and loaders)."""
    load_plugins(stages.cfg.plugins)
    return stages.run(name)


def run_stages(stages: Stages, targets: list[str] | None = None) -> dict:
    """Run (or resume) `targets` and their inputs in dependency order; returns every stage's record.

    With `jobs > 1`, stages whose inputs are done run side by side in `jobs` worker processes; an
    exclusive stage waits until nothing else runs and then runs in this process. Each stage is
    seeded on its own, so the schedule never changes a result."""
    order = plan(stages.graph, targets)
    records = {n: stages.done(n) for n in order}
    todo = [n for n in order if records[n] is None]
    if stages.cfg.jobs <= 1 or len(todo) <= 1:
        for n in todo:
            records[n] = stages.run(n)
        return records
    with ProcessPoolExecutor(max_workers=stages.cfg.jobs, mp_context=get_context("spawn")) as ex:
        running: dict = {}
        while todo or running:
            ready = [n for n in todo if all(records[d] is not None for d in stages.graph[n].needs)]
            for n in ready:
                if stages.graph[n].exclusive:
                    if not running:
                        todo.remove(n)
                        records[n] = stages.run(n)
                    break
                if len(running) >= stages.cfg.jobs:
                    break
                todo.remove(n)
                running[ex.submit(_run_in_worker, stages, n)] = n
            if running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    records[running.pop(f)] = f.result()
    return records


def _save_tensors(path: Path, tensors: dict) -> None:
    atomic_save_safetensors({k: v.contiguous() for k, v in tensors.items() if v is not None}, path)


def _load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------------- stages
@stage("tokenizer")
def stage_tokenizer(s: Stages, out: Path) -> dict:
    from .tokenizer import build_tokenizer, check_tokenizer

    # build into a sub folder (build_tokenizer replaces its target), then flatten
    tok = build_tokenizer(out / "tok", vocabulary())
    check_tokenizer(tok, vocabulary())
    for f in (out / "tok").iterdir():
        os.replace(f, out / f.name)
    (out / "tok").rmdir()
    return {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id}


@stage("data")
def stage_data(s: Stages, out: Path) -> dict:
    """Rendered training images (round-robin styles) and a held-out set for the classifier."""
    from .render import render_arrays

    cfg = s.cfg
    n = cfg.images_per_style * len(cfg.styles)
    images, contents, names = render_arrays(n, cfg.seed, cfg.styles)
    test, tcontents, tnames = render_arrays(max(64, n // 16), cfg.seed + 1_000_003, cfg.styles)
    row = {c: i for i, c in enumerate(all_captions())}

    def labels(cs, ns, prefix=""):
        d = {f"{prefix}style": np.array([cfg.styles.index(x) for x in ns], np.int64),
             f"{prefix}caption_row": np.array([row[c.caption] for c in cs], np.int64)}
        for a in ATTRIBUTES:
            d[f"{prefix}{a}"] = np.array([attribute_values(a).index(getattr(c, a)) for c in cs], np.int64)
        return d

    np.savez(out / "data.npz", images=images, test_images=test, **labels(contents, names),
             **labels(tcontents, tnames, "test_"))
    return {"images": n, "test_images": len(test)}


@stage("clip", needs=("tokenizer",))
def stage_clip(s: Stages, out: Path) -> dict:
    import torch

    from .models import count_params, make_clip
    from .train import clip_top1, train_clip

    cfg = s.cfg
    tok = s.tokenizer()
    torch.manual_seed(cfg.seed + 1)
    clip = make_clip(cfg.clip, tok)
    train_clip(clip, tok, cfg.styles, cfg.clip_steps, cfg.seed + 1, progress=cfg.progress)
    clip.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return {"top1_of_64": clip_top1(clip, tok, cfg.styles, cfg.seed + 2), "params": count_params(clip)}


@stage("vae", needs=("data",))
def stage_vae(s: Stages, out: Path) -> dict:
    import torch

    from .models import count_params, make_vae
    from .train import encode_latents, to_unit, train_vae, vae_roundtrip

    cfg = s.cfg
    d = s.data()
    x = to_unit(d["images"])
    torch.manual_seed(cfg.seed + 3)
    vae = make_vae(cfg.resolution)
    train_vae(vae, x, cfg.vae_steps, cfg.seed + 3, batch_size=cfg.batch_size, lr=cfg.vae_lr, progress=cfg.progress)
    z = encode_latents(vae, x[:4096], scaled=False)
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(str(out))
    xt = to_unit(d["test_images"])
    mse = (vae_roundtrip(vae, xt) - xt).pow(2).mean().item()
    return {"test_mse": mse, "scaling_factor": vae.config.scaling_factor, "params": count_params(vae)}


def _classifier_data(s: Stages, roundtrip: bool):
    """Rendered training images plus (roundtrip) a VAE-round-tripped copy of some of them, with labels."""
    import torch

    from .train import to_unit, vae_roundtrip

    d = s.data()
    x = to_unit(d["images"])
    k = min(s.cfg.classifier_roundtrip, len(x)) if roundtrip else 0
    if k == 0:
        return x, {a: torch.from_numpy(d[a]) for a in ("style", *ATTRIBUTES)}, d
    x = torch.cat([x, vae_roundtrip(s.vae(), x[:k])])
    labels = {a: torch.from_numpy(np.concatenate([d[a], d[a][:k]])) for a in ("style", *ATTRIBUTES)}
    return x, labels, d


def _classifier_test(model, d) -> dict:
    import torch

    from .train import to_unit

    pred = model.predict(to_unit(d["test_images"]))
    return {a: float((pred[a] == torch.from_numpy(d[f"test_{a}"])).float().mean()) for a in ("style", *ATTRIBUTES)}


@stage("classifier_render", needs=("data",))
def stage_classifier_render(s: Stages, out: Path) -> dict:
    """Classifier trained on rendered images only (with generated-image-like augmentation)."""
    import torch

    from .classifier import ClassifierConfig, ToyClassifier, train_classifier

    cfg = s.cfg
    x, labels, d = _classifier_data(s, roundtrip=False)
    torch.manual_seed(cfg.seed + 4)
    model = ToyClassifier(ClassifierConfig(styles=list(cfg.styles), resolution=cfg.resolution))
    train_classifier(model, x, labels, cfg.classifier_steps, cfg.seed + 4, progress=cfg.progress)
    model.save(out)
    return {"render_test_accuracy": _classifier_test(model, d)}


@stage("cond", needs=("tokenizer", "clip", "vae", "data"))
def stage_cond(s: Stages, out: Path) -> dict:
    """Cache caption conditioning (via the pipeline's encode_prompt) and the training latents."""
    import torch

    from .conditioning import encode_captions
    from .models import make_pipeline, text_encoders_from_clip
    from .train import encode_latents, pooled_rms, to_unit

    cfg = s.cfg
    tok, clip, vae = s.tokenizer(), s.clip(), s.vae()
    scale = 1.0
    if get_arch(cfg.arch).uses_text_time:  # fold 1/RMS of the pooled embedding into text_projection
        scale = 1.0 / pooled_rms(text_encoders_from_clip(clip)[1], tok)
    atomic_write_json(out / "cond.json", {"pooled_scale": scale})
    pipe = make_pipeline(cfg.arch, tok, text_encoders_from_clip(clip, scale), vae, unet=_new_unet(cfg))
    table = encode_captions(pipe, all_captions(), cfg.resolution)
    _save_tensors(out / "table.safetensors", table.state_dict())
    d = s.data()
    lat = encode_latents(vae, to_unit(d["images"]))
    _save_tensors(out / "latents.safetensors", {"latents": lat, "caption_row": torch.from_numpy(d["caption_row"]),
                                                 "style": torch.from_numpy(d["style"])})
    return {"pooled_scale": scale, "prompt_embeds_std": float(table.prompt_embeds.std()),
            "latent_std": float(lat.std())}


def _new_unet(cfg: BuildConfig):
    from .models import make_unet

    width = cfg.clip.hidden
    return make_unet(cfg.arch, cfg.unet, text_width=width, pooled_dim=cfg.clip.projection_dim,
                     latent_size=cfg.latent_size)


def _base_worker(rank: int, cfg: BuildConfig, cache: str, out: str, world: int) -> None:
    """One data-parallel rank of the base training (each rank: batch_size / world samples per step)."""
    import torch
    import torch.distributed as dist

    from .train import allreduce_mean_grads, train_unet

    torch.set_num_threads(cfg.threads)
    s = Stages(cfg, Path(cache))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{Path(out).resolve()}/.ddp_rendezvous", rank=rank, world_size=world)
    lat, table = s.latents(), s.table()
    torch.manual_seed(cfg.seed + 5)  # identical initial weights on every rank
    unet = _new_unet(cfg)
    unet = train_unet(unet, lat["latents"], lat["caption_row"], table, cfg.base_steps, cfg.seed + 5 + 1000 * rank,
                      lr=cfg.base_lr, warmup=min(100, cfg.base_steps // 10 + 1), batch_size=cfg.batch_size // world,
                      desc="base", progress=cfg.progress and rank == 0,
                      sync_grads=allreduce_mean_grads if world > 1 else None)
    if rank == 0:
        unet.save_pretrained(str(Path(out) / "unet"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


@stage("base", needs=("cond",), exclusive=True)
def stage_base(s: Stages, out: Path) -> dict:
    """Base UNet on style-mixed data; data-parallel over `jobs` single-thread processes (gloo)."""
    from .models import count_params

    cfg = s.cfg
    world = max(1, min(cfg.jobs, 2))
    if world == 1:
        _base_worker(0, cfg, str(s.cache), str(out), 1)
    else:
        import torch.multiprocessing as mp

        mp.start_processes(_base_worker, args=(cfg, str(s.cache), str(out), world), nprocs=world,
                           start_method="spawn")
        rendezvous = out / ".ddp_rendezvous"
        if rendezvous.exists():
            rendezvous.unlink()
    return {"params": count_params(s.unet_from(out)), "data_parallel_processes": world}


def _sample_seeds(cfg: BuildConfig) -> dict:
    return {"eval_prompts": cfg.seed + 101, "eval_noise": cfg.seed + 202,
            "train_prompts": cfg.seed + 303, "train_noise": cfg.seed + 404}


def _generate_sets(s: Stages, unet, out: Path, with_train: bool) -> None:
    from .content import sample_contents
    from .train import generate

    cfg, seeds = s.cfg, _sample_seeds(s.cfg)
    pipe = s.pipeline(unet)
    caps = [c.caption for c in sample_contents(cfg.eval_samples, seeds["eval_prompts"])]
    sets = {"eval": generate(pipe, caps, seeds["eval_noise"], cfg.sample_steps, cfg.guidance)}
    if with_train and cfg.teacher_train_samples > 0:
        caps = [c.caption for c in sample_contents(cfg.teacher_train_samples, seeds["train_prompts"])]
        sets["train"] = generate(pipe, caps, seeds["train_noise"], cfg.sample_steps, cfg.guidance)
    _save_tensors(out / "samples.safetensors", sets)


@stage("teacher_{style}", needs=("base", "tokenizer", "clip", "vae", "cond"))
def stage_teacher(s: Stages, out: Path, style: str) -> dict:
    """Fine-tune the base on one style only (captions never name it), then sample from it."""
    import torch

    from .train import train_unet

    cfg = s.cfg
    lat, table = s.latents(), s.table()
    keep = lat["style"] == cfg.styles.index(style)
    k = cfg.styles.index(style)
    torch.manual_seed(cfg.seed + 10 + k)
    unet = train_unet(s.unet("base"), lat["latents"][keep], lat["caption_row"][keep], table,
                      cfg.teacher_steps, cfg.seed + 10 + k, lr=cfg.teacher_lr,
                      warmup=min(20, cfg.teacher_steps // 10 + 1), batch_size=cfg.batch_size,
                      ema_decay=0.99, desc=f"teacher {style}", progress=cfg.progress)
    unet.save_pretrained(str(out / "unet"))
    _generate_sets(s, unet, out, with_train=True)
    return {}


@stage("base_samples", needs=("base", "tokenizer", "clip", "vae", "cond"))
def stage_base_samples(s: Stages, out: Path) -> dict:
    _generate_sets(s, s.unet("base"), out, with_train=False)
    return {}


@stage("classifier", needs=("classifier_render", "data", "vae", "teacher_{style}"))
def stage_classifier(s: Stages, out: Path) -> dict:
    """Fine-tune the render-only classifier on rendered images, VAE round trips of some of them and
    a few samples of each teacher (style label only), so it is trusted on generated images.
    Evaluation uses other prompts and noise seeds."""
    import torch

    from .classifier import ToyClassifier, train_classifier

    cfg = s.cfg
    model = ToyClassifier.load(s.dir("classifier_render"))
    if cfg.teacher_train_samples > 0 and cfg.classifier_ft_steps > 0:
        x, labels, d = _classifier_data(s, roundtrip=True)
        gen = [_load_tensors(s.dir(f"teacher_{st}") / "samples.safetensors")["train"] for st in cfg.styles]
        gl = torch.cat([torch.full((len(g),), k) for k, g in enumerate(gen)])
        x = torch.cat([x] + gen)
        # generated samples: repeated so that ~1/4 of each batch is generated; content unknown (-1)
        labels = {a: torch.cat([v, gl if a == "style" else torch.full_like(gl, -1)]) for a, v in labels.items()}
        reps = max(1, len(x) // (3 * len(gl)))
        extra = torch.arange(len(x) - len(gl), len(x)).repeat(reps)
        idx = torch.cat([torch.arange(len(x)), extra])
        torch.manual_seed(cfg.seed + 6)
        train_classifier(model, x[idx], {a: v[idx] for a, v in labels.items()}, cfg.classifier_ft_steps,
                         cfg.seed + 6, lr=5e-4, progress=cfg.progress)
    else:
        d = s.data()
    model.save(out)
    return {"render_test_accuracy": _classifier_test(model, d)}


def _sample_report(model, images, contents, own: int | None, styles: list[str]) -> dict:
    import torch

    pred = model.predict(images)
    hist = torch.bincount(pred["style"], minlength=len(styles)).tolist()
    rep = {"n": len(images), "style_histogram": dict(zip(styles, hist)),
           "content_accuracy": {a: float((pred[a] == torch.tensor([c.labels()[a] for c in contents])).float().mean())
                                for a in ATTRIBUTES}}
    if own is not None:
        rep["own_style_accuracy"] = float((pred["style"] == own).float().mean())
    return rep


@stage("report", needs=("classifier", "classifier_render", "base_samples", "teacher_{style}"))
def stage_report(s: Stages, out: Path) -> dict:
    """Judge every teacher (own-style accuracy) and the base on held-out samples."""
    from .classifier import ToyClassifier
    from .content import sample_contents

    cfg = s.cfg
    contents = sample_contents(cfg.eval_samples, _sample_seeds(cfg)["eval_prompts"])
    final = ToyClassifier.load(s.dir("classifier"))
    render_only = ToyClassifier.load(s.dir("classifier_render"))
    teachers = {}
    for k, st in enumerate(cfg.styles):
        imgs = _load_tensors(s.dir(f"teacher_{st}") / "samples.safetensors")["eval"]
        rep = _sample_report(final, imgs, contents, k, cfg.styles)
        rep["own_style_accuracy_render_only_classifier"] = _sample_report(render_only, imgs, contents, k,
                                                                          cfg.styles)["own_style_accuracy"]
        teachers[st] = rep
    base = _sample_report(final, _load_tensors(s.dir("base_samples") / "samples.safetensors")["eval"], contents,
                          None, cfg.styles)
    return {"teachers": teachers, "base": base}


# ------------------------------------------------------------------------------------------ assemble
def save_pipeline(s: Stages, name: str, folder: Path) -> None:
    """Stage `name`'s UNet with the world's text encoders and VAE as a pipeline folder (fp16 weights
    when `half_precision`)."""
    import torch

    pipe = s.pipeline(s.unet(name))
    if s.cfg.half_precision:
        pipe.unet.to(torch.float16)
        pipe.vae.to(torch.float16)
    pipe.save_pretrained(str(folder))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def assemble(s: Stages, records: dict, wall_s: float, stages_s: float, command: str) -> Path:
    """Write the world folder (pipelines, CLIP, tokenizer, classifier, world.json) atomically."""
    from .models import count_params

    cfg = s.cfg
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        s.tokenizer().save_pretrained(str(tmp / "tokenizer"))
        shutil.copytree(s.dir("clip"), tmp / "clip", ignore=shutil.ignore_patterns("done.json"))
        shutil.copytree(s.dir("classifier"), tmp / "classifier", ignore=shutil.ignore_patterns("done.json"))
        teachers = {st: f"teachers/{st}" for st in cfg.styles}
        for name, rel in [("base", "base")] + [(f"teacher_{st}", p) for st, p in teachers.items()]:
            save_pipeline(s, name, tmp / rel)
        report = records["report"]["metrics"]
        meta = {
            "format": 1,
            "seed": cfg.seed,
            "arch": cfg.arch,
            "scale": cfg.scale,
            "styles": list(cfg.styles),
            "registered_styles": list_styles(),
            "resolution": cfg.resolution,
            "latent_size": cfg.latent_size,
            "vocabulary": vocabulary(),
            "attributes": {a: list(attribute_values(a)) for a in ATTRIBUTES},
            "n_captions": len(all_captions()),
            "sampling": {"num_inference_steps": cfg.sample_steps, "guidance_scale": cfg.guidance},
            "paths": {"base": "base", "teachers": teachers, "clip": "clip", "tokenizer": "tokenizer",
                      "classifier": "classifier"},
            "sizes": {"unet_params": count_params(s.unet("base")), "vae_params": count_params(s.vae()),
                      "clip_params": records["clip"]["metrics"]["params"],
                      "training_images": records["data"]["metrics"]["images"],
                      "asset_bytes": _dir_bytes(tmp)},
            "metrics": {
                "clip_top1_of_64": records["clip"]["metrics"]["top1_of_64"],
                "vae_test_mse": records["vae"]["metrics"]["test_mse"],
                "classifier_render_test_accuracy": records["classifier"]["metrics"]["render_test_accuracy"],
                "classifier_trained_on_teacher_samples": cfg.teacher_train_samples if cfg.classifier_ft_steps else 0,
                "own_style_accuracy": {st: r["own_style_accuracy"] for st, r in report["teachers"].items()},
                "teachers": report["teachers"],
                "base": report["base"],
                "eval_seeds": _sample_seeds(cfg),
            },
            "timings_s": {**{k: v["wall_s"] for k, v in records.items()}, "sum_of_stages": round(stages_s, 1),
                          "this_run_wall_before_assembly": round(wall_s, 1)},
            "build": {"command": command, "config": _jsonable(asdict(cfg))},
        }
        atomic_write_text(tmp / WORLD_JSON, json.dumps(meta, indent=1))
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def build(cfg: BuildConfig, cache: str | os.PathLike | None = None, command: str = "") -> Path:
    """Run (or resume) every stage and assemble the world folder at `cfg.out`."""
    import torch

    torch.set_num_threads(cfg.threads)
    load_plugins(cfg.plugins)
    stages = Stages(cfg, (Path(cache) if cache else default_cache(cfg)).resolve())
    stages.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rec = run_stages(stages)
    total = sum(r["wall_s"] for r in rec.values())  # a resumed build: stage times from the first run
    wall = time.time() - t0
    out = assemble(stages, rec, wall, total, command)
    if cfg.progress:
        print(f"toy world written to {out} in {wall:.0f}s (sum of stage times {total:.0f}s)", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m dmm.toyworld.build", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="assets/toyworld")
    p.add_argument("--arch", choices=sorted(ARCHS), default="sdxl")
    p.add_argument("--styles", default=None, help="comma-separated registered styles (default: %(default)s)")
    p.add_argument("--scale", choices=("tiny", "full"), default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None, help="parallel single-thread worker processes")
    p.add_argument("--cache", default=None, help="intermediate folder (default .cache/toyworld/<config>)")
    p.add_argument("--plugin", action="append", default=None, metavar="MODULE_OR_FILE.py",
                   help="a module or .py file that registers styles (repeatable); see dmm/toyworld/styles.py")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--lora-teachers", action="store_true",
                   help="add LoRA teachers (teachers_lora/<style>.safetensors) to the existing world at --out "
                        "instead of building one (see dmm/toyworld/lora_teachers.py)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.lora_teachers:
        from .lora_teachers import build_lora_teachers

        command = "python -m dmm.toyworld.build " + " ".join(argv if argv is not None else sys.argv[1:])
        styles = parse_styles(a.styles) if a.styles else None
        for style, r in build_lora_teachers(a.out, jobs=a.jobs or 2, styles=styles, command=command).items():
            print(f"LoRA teacher {style}: own-style accuracy {r['own_style_accuracy']:.3f} "
                  f"(full teacher {r['full_teacher_own_style_accuracy']}), {r['file_bytes'] // 1024} KB",
                  file=sys.stderr)
        return Path(a.out)
    cfg = make_config(a.out, a.scale, arch=a.arch, styles=a.styles, seed=a.seed, jobs=a.jobs,
                      progress=False if a.no_progress else None, plugins=a.plugin)
    command = "python -m dmm.toyworld.build " + " ".join(argv if argv is not None else sys.argv[1:])
    return build(cfg, a.cache, command)


if __name__ == "__main__":
    main()
