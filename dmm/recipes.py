"""Recipes: one typed, self-describing schema for a merge.

Every key is declared once below, with its type (`Literal` for choices), default, bounds, a
one-line help text and whether it may change when a run resumes. A misspelt key is an error
naming the closest valid one; a value out of range names the key. Component names (engine,
teacher format) are checked against the live registries, so user-registered components (loaded
through `plugins:`) are accepted. YAML is read with the safe loader, `--set a.b=value` overrides
the same way. Relative input paths in a recipe file resolve against that file's folder; paths
given with `--set` resolve against the current folder.

    python -m dmm.recipes --explain [SECTION]                  every key: type, default, help
    python -m dmm.recipes --explain recipes/x.yaml [--set ...]  the resolved recipe and where each value came from
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dmm.io import atomic_write_text
from dmm.schema import ConfigError, KeyDoc, build, document, flatten, join, setting


class RecipeError(ConfigError):
    """A recipe that cannot be used as written; the message says what to change."""


@dataclass
class TeacherSpec:
    name: str = setting(help="style name of this teacher; the student's style prompt of the same name")
    path: str = setting("", help="diffusers folder or single-file checkpoint of the fine-tuned model (a LoRA "
                                 "teacher gives `lora` instead)", path=True)
    format: str = setting("auto", help="teacher format (auto detects diffusers folder, .safetensors or .ckpt)",
                          registry="teacher format")
    allow_pickle: bool = setting(False, help="load a pickled .ckpt (read with torch.load(weights_only=True))")
    options: dict[str, Any] = setting(default_factory=dict, help="options of the teacher format (see its entry)")
    text_encoder: Literal["auto", "own", "base"] = setting(
        "auto", help="auto: the teacher's own text encoder(s) where they differ from the base's weights; own: "
                     "require them; base: always the base's")
    lora: str = setting("", path=True, help="a LoRA file (.safetensors; kohya, diffusers or peft layout): the "
                                            "teacher is `base` with it fused at `scale` (format lora)")
    base: str = setting("", path=True, help="LoRA teachers: the pipeline folder the LoRA was trained on; empty: "
                                            "model.base")
    scale: float = setting(1.0, help="LoRA teachers: strength of the LoRA fused into its base")


@dataclass
class ModelConfig:
    base: str = setting("", help="the common base: a diffusers pipeline folder (text encoders, VAE, scheduler, "
                                 "UNet)", path=True)
    arch: Literal["auto", "sd15", "sdxl"] = setting("auto", help="architecture; auto reads it from the base UNet")
    teacher_dtype: Literal["float32", "bfloat16"] = setting("float32", help="dtype of the frozen teachers",
                                                            resumable=True)
    init_from: str = setting("", path=True,
                             help="start the student from this merged model folder instead of the base (its style "
                                  "names must be the teachers' names; a later stage of `stages:` sets it itself)")
    init_unet: str = setting("", path=True,
                             help="start the student's UNet weights from this UNet (any teacher format, e.g. the "
                                  "teachers' weight average from `python -m dmm.merge --method weighted_sum`) "
                                  "instead of the base's; the style codebook still starts random")
    init_average: bool = setting(False, help="start the student's UNet from the teachers' weight average instead "
                                             "of the base (the run makes it with dmm.merge's weighted_sum, into "
                                             "<train.output_dir>/init_unet.safetensors); the codebook starts random")


@dataclass
class ToyDataConfig:
    world: str = setting("assets/toyworld", help="toy world folder (python -m dmm.toyworld.build)", path=True)
    n_samples: int = setting(8192, help="images rendered into training shards", ge=1)
    seed: int = setting(0, help="seed of the rendered training set")
    samples_per_shard: int = setting(1024, help="images per webdataset shard", ge=1)


@dataclass
class SynthesizedDataConfig:
    """The teachers' own images (paper: "teacher models synthesize a small number of images"): slot i of
    a micro-batch reads teacher i's images. Made by the stage itself when the folder is incomplete, or
    ahead with `python -m dmm.data.synthesize` (dmm/data/synthesize.py)."""

    path: str = setting("", path=True, help="folder of the images (<path>/<style>/shard-*.tar and manifest.json)")
    per_teacher: int = setting(1500, help="images each teacher generates (paper: 1.5k)", ge=1)
    prompts: str = setting("", path=True, help="a text file of prompts, one a line; empty: the first distinct "
                                               "captions of the recipe's shards or toy world")
    steps: int = setting(25, help="sampler steps (the base pipeline's scheduler)", ge=1)
    guidance_scale: float = setting(7.0, help="classifier-free guidance scale", ge=0.0)
    seed: int = setting(0, help="image k of every teacher uses seed + k (keep it apart from evaluation seeds)")
    batch_size: int = setting(8, help="images per pipeline call; fixed for a folder (batched kernels round "
                                      "differently)", ge=1)
    samples_per_shard: int = setting(1000, help="images per webdataset shard", ge=1)


@dataclass
class DataConfig:
    shards: list[str] = setting(default_factory=list, path=True,
                                help="webdataset tar shards of (image, caption): paths, brace or glob patterns")
    toyworld: ToyDataConfig | None = setting(None, toy=True, help="render shards from the toy world instead")
    synthesized: SynthesizedDataConfig | None = setting(
        None, help="train on images the teachers generate, teacher i's for slot i (the paper's fine-tuning stage); "
                   "the shards or toy world above then only give the default prompts")
    image_key: str = setting("png", help="image extension inside the shards")
    caption_key: str = setting("txt", help="caption extension inside the shards")
    resolution: int = setting(32, help="training resolution in pixels", ge=8)
    batch_size: int = setting(32, help="samples per process and micro-step", ge=1)
    caption_dropout: float = setting(0.1, help="share of captions dropped to '' (CFG), shared by student and "
                                               "teacher", ge=0.0, lt=1.0)
    shuffle_buffer: int = setting(256, help="webdataset shuffle buffer (samples)", ge=0)
    num_workers: int = setting(0, help="data loader worker processes", ge=0, resumable=True)
    precomputed: str = setting("", path=True, help="a folder of precomputed latents and text conditioning "
                                                   "(python -m dmm.data.precompute): training loads no VAE or text "
                                                   "encoder; its manifest must match this recipe")
    buckets: Any = setting(None, help="aspect-ratio buckets: a list of [height, width] or a preset (sd15, sdxl: "
                                      "scaled to `resolution`); each batch is one bucket; null: square images")
    bucket_crop: Literal["center", "random"] = setting("center", help="where a bucket is cut from the resized "
                                                                      "image (random: fixed per sample by the seed)")


@dataclass
class LossConfig:
    lambda_feat: float = setting(0.001, help="weight of feature imitation (block outputs)", ge=0.0)
    lambda_adv: float = setting(0.01, help="weight of the multi-class adversarial loss; 0 drops the "
                                           "discriminator", ge=0.0)
    disc_t_max: int = setting(1000, help="re-noising timesteps of the discriminator's input are drawn below this",
                              ge=1)
    mix_share: float = setting(0.0, help="share of samples trained on a random mixture of their style and another "
                                         "teacher's on the same rank (weight w ~ U(0,1)), supervised by the same "
                                         "mixture of the two teachers' outputs and features; they skip the "
                                         "adversarial loss. For gradual style mixing; 0: off", ge=0.0, le=1.0)
    uncond_weight: float = setting(0.0, help="also distil every sample's unconditional output (the empty caption, "
                                             "same noisy latent and style) with this weight on its MSE; CFG "
                                             "sampling amplifies that branch's error, which caption dropout alone "
                                             "trains on few samples. One more teacher forward per step and a "
                                             "doubled student batch; 0: off", ge=0.0)


@dataclass
class ObjectiveConfig:
    name: str = setting("dmm", registry="objective",
                        help="what a training step computes: dmm (the paper's three losses) or a registered stage")
    options: dict[str, Any] = setting(default_factory=dict,
                                      help="options of the objective (python -m dmm.recipes --explain objective)")


@dataclass
class OptimConfig:
    lr: float = setting(1e-5, help="student learning rate (AdamW)", gt=0.0)
    disc_lr: float = setting(1e-5, help="discriminator learning rate (AdamW)", gt=0.0)
    weight_decay: float = setting(1e-2, help="AdamW weight decay", ge=0.0)
    betas: list[float] = setting(default_factory=lambda: [0.9, 0.999], help="AdamW betas: two values in [0, 1)",
                                 ge=0.0, lt=1.0)
    grad_clip: float = setting(1.0, help="gradient-norm clip; 0 turns clipping off", ge=0.0)
    warmup_steps: int = setting(0, help="linear learning-rate warm-up steps", ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = setting(
        "constant", help="learning rate after warm-up: constant, or decaying to min_lr_ratio x lr at "
                         "the run's last step (cosine or linear); applies to the student and the discriminator")
    min_lr_ratio: float = setting(0.1, help="where a decaying lr_schedule ends, as a share of the peak lr",
                                  ge=0.0, le=1.0)
    style_lr_multiplier: float = setting(1.0, help="lr factor of the new style codebook and MLP", gt=0.0)
    ema_decay: float = setting(0.0, help="keep an exponential moving average of the student's weights with this "
                                         "decay (e.g. 0.999) and export it instead of the raw weights; 0: off",
                               ge=0.0, lt=1.0)


@dataclass
class TrainConfig:
    max_steps: int = setting(100_000, help="optimizer steps of the whole run", ge=1, resumable=True)
    output_dir: str = setting("runs/dmm", help="run folder (relative to the current folder): checkpoints, "
                                               "logs, merged model", resumable=True)
    seed: int = setting(0, help="seed of noise, timesteps and caption dropout")
    mixed_precision: Literal["no", "bf16"] = setting("no", help="bf16 autocast of the student")
    log_every: int = setting(10, help="steps between TensorBoard scalars", ge=1, resumable=True)
    checkpoint_every: int = setting(1000, help="steps between checkpoints", ge=1, resumable=True)
    keep_last: int = setting(3, help="complete checkpoints kept (the newest is never removed)", ge=1,
                             resumable=True)
    resume: str = setting("auto", resumable=True,
                          help="auto: continue a compatible run in output_dir; never: start fresh (an earlier run "
                               "there moves to previous-runs/<time>/); latest; or a checkpoint folder")
    gradient_checkpointing: bool = setting(False, help="recompute activations in backward (less memory): the "
                                                       "student's and the discriminator's UNet blocks",
                                           resumable=True)


@dataclass
class LogConfig:
    """TensorBoard extras beyond the losses (dmm/train/tblog.py); none of them changes what is trained."""

    samples: bool = setting(True, resumable=True,
                            help="sample grids of every style at each checkpoint (main rank; a few images, few "
                                 "steps; the same prompts and seeds every time)")
    sample_prompts: list[str] = setting(default_factory=list, resumable=True,
                                        help="prompts of the grids (one column each); empty: the first distinct "
                                             "captions of the training shards")
    num_prompts: int = setting(4, help="columns per grid when sample_prompts is empty", ge=1, resumable=True)
    sample_steps: int = setting(8, help="sampler steps of the grids (the base pipeline's scheduler)", ge=1,
                                resumable=True)
    sample_guidance_scale: float = setting(3.0, help="classifier-free guidance scale of the grids", ge=0.0,
                                           resumable=True)
    sample_seed: int = setting(0, help="seed of the grids' first column (one seed per column)", resumable=True)


@dataclass
class PerfConfig:
    """Switches that change speed, not what is computed (each has a CPU test within float tolerance)."""

    host_sync: Literal["auto", "step", "log"] = setting(
        "auto", resumable=True,
        help="step: losses become Python floats and are checked for NaN every micro-step (nothing is updated "
             "after a NaN); log: they stay on the device and are checked at log and checkpoint steps (no per-step "
             "host-device synchronisation); auto: log on CUDA, step elsewhere")
    device_rng: Literal["auto", "on", "off"] = setting(
        "auto", help="draw noise and timesteps with a generator on the training device (no host-to-device copy; "
                     "saved in checkpoints); auto: on for CUDA. On the CPU the device generator IS the CPU one")
    fused_adamw: Literal["auto", "on", "off"] = setting("auto", resumable=True,
                                                        help="fused AdamW kernels (auto: on for CUDA)")
    channels_last: bool = setting(False, resumable=True,
                                  help="student (and its inputs) in channels_last memory format")
    attention: Literal["sdpa", "classic"] = setting(
        "sdpa", resumable=True, help="attention of every UNet: sdpa (torch scaled_dot_product_attention, flash/memory-efficient "
                     "kernels on GPUs) or classic (explicit softmax(QK^T)V)")
    compile: Literal["none", "blocks"] = setting(
        "none", resumable=True, help="torch.compile each down/mid/up block of the student and teachers (first steps are slow)")
    compile_backend: str = setting("inductor", resumable=True, help="torch.compile backend (inductor; aot_eager for debugging)")


@dataclass
class DistributedConfig:
    engine: str = setting("none", help="training engine: none (one process), deepspeed, fsdp2, or a registered one",
                          registry="engine")
    options: dict[str, Any] = setting(default_factory=dict,
                                      help="options of the engine, e.g. {zero_stage: 2} (python -m dmm.recipes --explain distributed)")
    grad_accum_steps: int = setting(1, help="micro-steps per optimizer step", ge=1)


@dataclass
class SampleConfig:
    """How the demo summary samples the merged model and the teachers (toy world)."""

    n_per_style: int = setting(64, help="images per style and model", ge=1, resumable=True)
    steps: int = setting(20, help="sampler steps", ge=1, resumable=True)
    guidance_scale: float = setting(3.0, help="classifier-free guidance scale", ge=0.0, resumable=True)
    seed: int = setting(1234, help="first image seed (one seed per image)", resumable=True)
    grid_prompts: int = setting(8, help="columns of the sample grids", ge=1, resumable=True)


@dataclass
class Recipe:
    name: str = setting(help="the recipe's name (recorded with the merged model)")
    model: ModelConfig = setting(help="the base model")
    teachers: list[TeacherSpec] = setting(help="the fine-tuned models to merge, one style each")
    plugins: list[str] = setting(default_factory=list, path=True, resumable=True,
                                 help="modules or .py files imported first; they register engines, formats, ...")
    data: DataConfig = setting(default_factory=DataConfig, help="training data")
    loss: LossConfig = setting(default_factory=LossConfig, help="loss weights")
    objective: ObjectiveConfig = setting(default_factory=ObjectiveConfig, help="what a training step computes")
    optim: OptimConfig = setting(default_factory=OptimConfig, help="optimizers")
    train: TrainConfig = setting(default_factory=TrainConfig, help="the training loop and the run folder")
    distributed: DistributedConfig = setting(default_factory=DistributedConfig, help="engine and scale-out")
    perf: PerfConfig = setting(default_factory=PerfConfig, help="speed switches: host syncs, device RNG, fused "
                                                                "AdamW, channels_last, attention, torch.compile")
    log: LogConfig = setting(default_factory=LogConfig, resumable=True,
                             help="TensorBoard extras: sample grids, learning rates, per-teacher losses")
    sample: SampleConfig = setting(default_factory=SampleConfig, toy=True, help="the demo summary's sampling")
    stages: list[dict[str, Any]] = setting(
        default_factory=list,
        help="run these stages in order instead of one run: each `{name, <section overrides>}` (e.g. objective, "
             "train.max_steps, data) on top of this recipe, in train.output_dir/<k>-<name>/, every stage after the "
             "first starting from the previous stage's merged model")

    @property
    def style_names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """The resolved recipe, written atomically (the run folder's record of what ran)."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# Keys that moved: an old recipe gets told where the value goes now.
MOVED = {
    "distributed.zero_stage": "distributed.options.zero_stage",
    "distributed.offload_optimizer": "distributed.options.offload_optimizer",
}


def keys() -> list[KeyDoc]:
    """Every recipe key, documented (what `--explain` prints)."""
    return document(Recipe)


def resumable_keys() -> list[str]:
    """Dotted keys (list items as `teachers[].x`) that may change between a run and its resumption."""
    return [doc.key for doc in keys() if doc.resumable]


@functools.cache
def _resumable_set() -> frozenset[str]:
    return frozenset(resumable_keys())


@functools.cache
def _defaults() -> dict:
    return {d.key: d.default for d in keys() if d.default != "(section)"}


def default_of(key: str):
    """The schema default of a flattened key (`teachers[0].lora` -> that of `teachers[].lora`), or
    `MISSING_DEFAULT` when it has none: a recipe saved before a key existed held its default."""
    return _defaults().get(re.sub(r"\[\d+\]", "[]", key), MISSING_DEFAULT)


MISSING_DEFAULT = object()


def is_resumable(key: str) -> bool:
    """`key` as flattened from a saved recipe (`teachers[0].path`, `data.toyworld.seed`, `plugins[1]`)."""
    generic = re.sub(r"\[\d+\]", "[]", key)
    allowed = _resumable_set()
    parts = generic.split(".")
    return any(".".join(parts[:i]).removesuffix("[]") in allowed or ".".join(parts[:i]) in allowed
               for i in range(1, len(parts) + 1))


def _check_moved(raw: dict) -> None:
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise RecipeError(f"{old} moved to {new}: write `{section}: {{options: {{{key}: ...}}}}`")


def apply_override(raw: dict, assignment: str) -> str:
    """`train.max_steps=10` -> raw["train"]["max_steps"] = 10 (value parsed as safe YAML); returns the key."""
    if "=" not in assignment:
        raise RecipeError(f"--set expects dotted.key=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise RecipeError(f"--set {assignment!r}: empty key part in {key!r}")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        reason = str(err).splitlines()[0]
        raise RecipeError(f"--set {key}: the value {value!r} is not valid safe YAML ({reason})") from None
    return key


def _resolve_paths(obj, raw_sources: dict[str, str], base: Path | None, prefix: str = "") -> None:
    """Make the relative input paths of a built recipe absolute: against `base` (the recipe file's
    folder) when the file gave them, against the current folder when --set did."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            _resolve_paths(value, raw_sources, base, key)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _resolve_paths(item, raw_sources, base, f"{key}[{i}]")
        elif f.metadata.get("path") and value:
            root = Path.cwd() if raw_sources.get(key) == "--set" or base is None else base
            if isinstance(value, list):
                setattr(obj, f.name, [_absolute(p, root, key) for p in value])
            else:
                setattr(obj, f.name, _absolute(value, root, key))


def _absolute(p: str, root: Path, key: str) -> str:
    """A plugin is a module name unless it is a .py file; every other path key holds paths."""
    if os.path.isabs(p) or (key == "plugins" and not p.endswith(".py")):
        return p
    return os.path.normpath(root / p)


def parse_recipe(raw, *, base: str | os.PathLike | None = None, sources: dict[str, str] | None = None) -> Recipe:
    """Build and check a recipe from a parsed mapping. `base`: the folder relative paths resolve against."""
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a mapping of sections (name, model, teachers, ...), got "
                          f"{type(raw).__name__}")
    _check_moved(raw)
    try:
        recipe = build(Recipe, raw, "")
    except RecipeError:
        raise
    except ConfigError as err:
        raise RecipeError(str(err)) from None
    _resolve_paths(recipe, sources or {}, Path(base) if base is not None else None)
    validate(recipe)
    if recipe.stages:
        recipe.stages = expand_stages(raw, recipe, base)
    return recipe


STAGE_FIXED = ("name", "stages", "plugins")  # a stage cannot override these


def _merge(into: dict, over: dict) -> dict:
    out = dict(into)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def expand_stages(raw: dict, recipe: Recipe, base) -> list[dict]:
    """Each stage as a complete, checked recipe (paths resolved), chained through model.init_from:
    a stage list that does not connect is refused here, before any model loads."""
    stages, names, previous = [], set(), None
    common = {k: v for k, v in raw.items() if k != "stages"}
    for k, stage in enumerate(recipe.stages):
        where = f"stages[{k}]"
        if not isinstance(stage, dict) or not str(stage.get("name", "")).strip():
            raise RecipeError(f"{where}: a stage is a mapping with a `name` and the sections it changes")
        name = str(stage["name"])
        if name in names or "/" in name:
            raise RecipeError(f"{where}: stage names must be unique and contain no '/'; {name!r} is not")
        names.add(name)
        fixed = sorted(set(stage) & set(STAGE_FIXED) - {"name"})
        if fixed:
            raise RecipeError(f"{where} ({name}): {fixed[0]} is the whole recipe's; set it at the top level")
        if "output_dir" in stage.get("train", {}):
            raise RecipeError(f"{where} ({name}): train.output_dir is derived (<recipe's output_dir>/{k + 1}-{name})")
        if previous is not None and stage.get("model", {}).get("init_from"):
            raise RecipeError(f"{where} ({name}): a later stage starts from the previous stage's merged model; "
                              "drop its model.init_from")
        merged = _merge(common, {key: v for key, v in stage.items() if key != "name"})
        merged = _merge(merged, {"name": f"{recipe.name}/{name}",
                                 "train": {"output_dir": str(Path(recipe.train.output_dir) / f"{k + 1}-{name}")}})
        if previous is not None:
            # absolute: train.output_dir is relative to the current folder, path keys to the recipe file's
            merged = _merge(merged, {"model": {"init_from": os.path.abspath(Path(previous.train.output_dir) / "merged"),
                                               "init_unet": "", "init_average": False}})
        try:
            built = parse_recipe(merged, base=base)
        except RecipeError as err:
            raise RecipeError(f"{where} ({name}): {err}") from None
        if previous is not None and built.style_names != previous.style_names:
            raise RecipeError(f"{where} ({name}): its teachers {built.style_names} are not the previous stage's "
                              f"{previous.style_names}; a stage continues the previous student's styles")
        stages.append(built.to_dict())
        previous = built
    return stages


def read_recipe(path: str | os.PathLike, overrides: list[str] | tuple = ()) -> tuple[dict, dict[str, str]]:
    """The raw mapping of a recipe file with overrides applied, and each key's source (file or --set)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise RecipeError(f"recipe {path} is not valid YAML: {reason}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping of sections (name, model, teachers, "
                          f"...), got {type(raw).__name__}")
    sources = dict.fromkeys(flatten(raw), "file")
    for assignment in overrides:
        key = apply_override(raw, assignment)
        sources = {k: v for k, v in sources.items() if not (k == key or k.startswith(key + ".")
                                                            or k.startswith(key + "["))}
        sources.update(dict.fromkeys(flatten(_get(raw, key.split(".")), key), "--set"))
    return raw, sources


def _get(raw: dict, parts: list[str]):
    for p in parts:
        raw = raw[p]
    return raw


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple = ()) -> Recipe:
    raw, sources = read_recipe(path, overrides)
    return parse_recipe(raw, base=Path(path).resolve().parent, sources=sources)


def _check_component(kind: str, name: str, options: dict | None, where: str):
    from dmm.registry import RegistryError, get_registry

    try:
        entry = get_registry(kind).get(name)
    except RegistryError as err:
        raise RecipeError(f"{where}: {err}") from None
    if options is not None:
        try:
            entry.parse_options(options, where.rsplit(".", 1)[0] + ".options")
        except ConfigError as err:
            raise RecipeError(str(err)) from None


def _fold_lora(t: TeacherSpec, where: str) -> None:
    """`{lora, base, scale}` is the short form of `{path: <lora>, format: lora, options: {scale, base}}`:
    fold it into the format's options so every loader sees one form (idempotent: a saved recipe re-reads)."""
    if not t.lora:
        if t.base or t.scale != 1.0:
            raise RecipeError(f"{where}: `base` and `scale` belong to LoRA teachers; add `lora: <file>` or drop them")
        if not t.path:
            raise RecipeError(f"{where}: give `path` (a fine-tuned model) or `lora` (a LoRA file on a base)")
        return
    if t.path and t.path != t.lora:
        raise RecipeError(f"{where}: give either `path` (a fine-tuned model) or `lora` (a LoRA file), not both")
    if t.format not in ("auto", "lora"):
        raise RecipeError(f"{where}: a `lora` teacher has format lora, not {t.format!r}; drop `format`")
    folded = {"scale": t.scale, **({"base": t.base} if t.base else {})}
    clash = sorted(k for k, v in folded.items() if k in t.options and t.options[k] != v)
    if clash:
        raise RecipeError(f"{where}: options.{clash[0]} ({t.options[clash[0]]!r}) disagrees with {clash[0]}: "
                          f"({folded[clash[0]]!r}); give it once")
    t.path, t.format, t.options = t.lora, "lora", {**t.options, **folded}


def validate(recipe: Recipe) -> None:
    """Checks across keys, and names against the live registries (after importing `plugins`)."""
    from dmm.registry import load_plugin

    for spec in recipe.plugins:
        try:
            load_plugin(spec)
        except ConfigError as err:
            raise RecipeError(str(err)) from None
    if not recipe.teachers:
        raise RecipeError("the recipe lists no teachers: add at least one under `teachers:`")
    names = recipe.style_names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"teacher names must be unique; repeated: {dupes}")
    for i, t in enumerate(recipe.teachers):
        if not t.name.strip():
            raise RecipeError(f"teachers[{i}].name is empty: give every teacher a style name")
        _fold_lora(t, f"teachers[{i}]")
        if t.format != "auto":  # options of `auto` are checked against the detected format at load
            _check_component("teacher format", t.format, t.options, f"teachers[{i}].format")
    if not recipe.model.base:
        raise RecipeError("model.base is empty: point it at the common base model's diffusers folder")
    starts = [k for k in ("init_from", "init_unet", "init_average") if getattr(recipe.model, k)]
    if len(starts) > 1:
        raise RecipeError(f"model.{' and model.'.join(starts)} each start the student: keep one (init_from continues "
                          "a merged model, codebook included; init_unet and init_average only set the UNet's weights)")
    lora = [t.name for t in recipe.teachers if t.format == "lora"]
    if recipe.model.init_average and lora:
        raise RecipeError(f"model.init_average averages full teachers' weights, but {lora} are LoRA teachers: fuse "
                          "them first (python -m dmm.merge), point model.init_unet at a merge, or drop init_average")
    if not recipe.data.shards and recipe.data.toyworld is None and recipe.data.synthesized is None:
        raise RecipeError("data: give `shards` (webdataset tar files), a `toyworld` or a `synthesized` section")
    if recipe.data.synthesized is not None and not recipe.data.synthesized.path:
        raise RecipeError("data.synthesized.path is empty: name the folder of the teachers' images (made by the "
                          "stage when incomplete, or by python -m dmm.data.synthesize)")
    if recipe.data.synthesized is not None and recipe.data.precomputed:
        raise RecipeError("data: `synthesized` and `precomputed` do not go together (the synthesized images are "
                          "read per teacher); drop data.precomputed in the synthesized stage")
    if recipe.data.synthesized is not None and recipe.data.buckets is not None:
        raise RecipeError("data: `synthesized` and `buckets` do not go together (the teachers generate square "
                          "images at data.resolution, so every batch would be one bucket); drop data.buckets in "
                          "the synthesized stage")
    if recipe.data.buckets is not None:
        from dmm.data.buckets import recipe_buckets

        try:
            recipe_buckets(recipe)
        except ConfigError as err:
            raise RecipeError(str(err)) from None
    if len(recipe.optim.betas) != 2:
        raise RecipeError(f"optim.betas must be two values in [0, 1), got {recipe.optim.betas}")
    out = Path(recipe.train.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"train.output_dir {out} is an existing file; choose a folder")
    _check_component("engine", recipe.distributed.engine, recipe.distributed.options, "distributed.engine")
    _check_component("objective", recipe.objective.name, recipe.objective.options, "objective.name")


# ----------------------------------------------------------------------------- explain
def explain_keys(section: str = "") -> str:
    """Every key (of `section`), with type, default, bounds, help and whether it may change on resume."""
    docs = [d for d in keys() if not section or d.key == section or d.key.startswith(section + ".")
            or d.key.startswith(section + "[")]
    if not docs:
        sections = sorted({d.key.split(".")[0].split("[")[0] for d in keys()})
        raise RecipeError(f"no recipe section or key {section!r}; sections: {sections}")
    lines = []
    for d in docs:
        if d.type == "section" or d.type.startswith("list[section"):
            lines.append(f"\n{d.key}:  {d.help}" + ("  [toy world only]" if d.toy else ""))
            continue
        extra = [f"default {d.default!r}"]
        if d.bounds:
            extra.append(d.bounds)
        if d.registry:
            extra.append(f"a registered {d.registry}")
        extra.append("may change on resume" if d.resumable else "fixed once a run started")
        if d.toy:
            extra.append("toy world only")
        lines.append(f"  {d.key}  ({d.type}; {'; '.join(extra)})\n      {d.help}")
    return "\n".join(lines).lstrip("\n")


def explain_recipe(path: str | os.PathLike, overrides: list[str] | tuple = ()) -> str:
    """The resolved recipe, one key per line, with where each value came from."""
    raw, sources = read_recipe(path, overrides)
    recipe = parse_recipe(raw, base=Path(path).resolve().parent, sources=sources)
    values = flatten(recipe.to_dict())
    width = max(len(k) for k in values)
    lines = [f"# {path}: resolved recipe (source: default | file | --set)"]
    for key in values:
        lines.append(f"{key:{width}s} = {values[key]!r:40s}  # {sources.get(key, 'default')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dmm.recipes", description="Explain recipe keys or a recipe.")
    parser.add_argument("--explain", nargs="?", const="", default=None, metavar="SECTION|RECIPE.yaml",
                        help="no argument: every key; a section (e.g. optim); or a recipe file to resolve")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.explain is None:
        parser.print_help()
        return 0
    try:
        if args.explain.endswith((".yaml", ".yml")) or Path(args.explain).is_file():
            print(explain_recipe(args.explain, args.overrides))
        else:
            print(explain_keys(args.explain))
            from dmm.registry import get_registry

            for section, kind, where in (("distributed", "engine", "distributed.engine, options under "
                                          "distributed.options"),
                                         ("teachers", "teacher format", "teachers[].format, options under "
                                          "teachers[].options"),
                                         ("objective", "objective", "objective.name, options under "
                                          "objective.options")):
                if args.explain in ("", section):
                    print(f"\n{kind}s ({where}):\n{get_registry(kind).describe()}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
