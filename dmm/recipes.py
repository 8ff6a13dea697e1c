"""Recipes: one typed, strictly validated schema for a merge.

A misspelt key is an error naming the key and the closest valid one, never a silent default.
YAML is read with the safe loader; `--set a.b=value` overrides are parsed the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be used as written; the message says what to change."""


@dataclass
class TeacherSpec:
    name: str
    path: str
    format: str = "auto"  # a registered teacher format: auto, diffusers, single_file, ckpt
    allow_pickle: bool = False  # `.ckpt` teachers only with explicit opt-in (loaded weights_only)


@dataclass
class ModelConfig:
    base: str = ""  # the common base: a diffusers pipeline folder (text encoders, VAE, scheduler, UNet)
    arch: str = "auto"  # auto | sd15 | sdxl
    teacher_dtype: str = "float32"  # float32 | bfloat16: frozen teachers may run in bf16


@dataclass
class ToyDataConfig:
    world: str = "assets/toyworld"
    n_samples: int = 8192
    seed: int = 0
    samples_per_shard: int = 1024


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # tar paths or brace patterns of (image, caption) pairs
    toyworld: ToyDataConfig | None = None  # build shards from the toy world instead
    image_key: str = "png"
    caption_key: str = "txt"
    resolution: int = 32
    batch_size: int = 32  # per process
    caption_dropout: float = 0.1  # shared by student and teacher (classifier-free guidance)
    shuffle_buffer: int = 256
    num_workers: int = 0


@dataclass
class LossConfig:
    lambda_feat: float = 0.001
    lambda_adv: float = 0.01
    disc_t_max: int = 1000  # re-noising timesteps for the discriminator's input are drawn below this


@dataclass
class OptimConfig:
    lr: float = 1e-5
    disc_lr: float = 1e-5
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0
    style_lr_multiplier: float = 1.0  # the codebook is new: a larger lr speeds short runs up


@dataclass
class TrainConfig:
    max_steps: int = 100_000
    output_dir: str = "runs/dmm"
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 (autocast)
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_last: int = 3
    resume: str | None = None  # None | "latest" | a checkpoint folder
    gradient_checkpointing: bool = False


@dataclass
class DistributedConfig:
    engine: str = "none"  # none | deepspeed | fsdp2
    zero_stage: int = 2
    offload_optimizer: bool = False
    grad_accum_steps: int = 1


@dataclass
class SampleConfig:
    """How the demo/summary samples the merged model and the teachers."""

    n_per_style: int = 64
    steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 1234
    grid_prompts: int = 8


@dataclass
class Recipe:
    name: str
    model: ModelConfig
    teachers: list[TeacherSpec]
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def style_names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """The resolved recipe, written atomically (the run folder's record of what ran)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)


CHOICES = {
    "model.arch": ("auto", "sd15", "sdxl"),
    "model.teacher_dtype": ("float32", "bfloat16"),
    "train.mixed_precision": ("no", "bf16"),
    "distributed.engine": ("none", "deepspeed", "fsdp2"),
}


def _build(cls, raw, where: str):
    """Build dataclass `cls` from `raw`, rejecting unknown keys with the closest valid one."""
    if dataclasses.is_dataclass(cls):
        if not isinstance(raw, dict):
            raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {type(raw).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {names}"
                raise RecipeError(f"unknown recipe key {_join(where, key)!r}{hint}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in raw:
                kwargs[f.name] = _build(hints[f.name], raw[f.name], _join(where, f.name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"recipe is missing the required key {_join(where, f.name)!r}")
        return cls(**kwargs)
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], raw, where)
    if origin is list:
        if not isinstance(raw, list):
            raise RecipeError(f"{where}: expected a list, got {raw!r}")
        return [_build(args[0], item, f"{where}[{i}]") for i, item in enumerate(raw)]
    if cls is float:
        if isinstance(raw, str):  # PyYAML reads `1e-3` (no dot) as a string: accept what float() accepts
            try:
                return float(raw)
            except ValueError:
                pass
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {raw!r}")
        return float(raw)
    if cls is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise RecipeError(f"{where}: expected an integer, got {raw!r}")
        return raw
    if cls is bool:
        if not isinstance(raw, bool):
            raise RecipeError(f"{where}: expected true or false, got {raw!r}")
        return raw
    if cls is str:
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise RecipeError(f"{where}: expected a string, got {raw!r}")
        value = str(raw)
        if where in CHOICES and value not in CHOICES[where]:
            raise RecipeError(f"{where}: {value!r} is not one of {list(CHOICES[where])}")
        return value
    raise RecipeError(f"{where}: unsupported type {cls}")


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def apply_override(raw: dict, assignment: str) -> None:
    """`train.max_steps=10` -> raw["train"]["max_steps"] = 10 (value parsed as YAML)."""
    if "=" not in assignment:
        raise RecipeError(f"--set expects dotted.key=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def parse_recipe(raw: dict) -> Recipe:
    recipe = _build(Recipe, raw, "")
    validate(recipe)
    return recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse_recipe(raw)


def validate(recipe: Recipe) -> None:
    if not recipe.teachers:
        raise RecipeError("the recipe lists no teachers: add at least one under `teachers:`")
    names = recipe.style_names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"teacher names must be unique; repeated: {dupes}")
    if not recipe.model.base:
        raise RecipeError("model.base is empty: point it at the common base model's diffusers folder")
    if not recipe.data.shards and recipe.data.toyworld is None:
        raise RecipeError("data: give `shards` (webdataset tar files) or a `toyworld` section")
    if not 0.0 <= recipe.data.caption_dropout < 1.0:
        raise RecipeError(f"data.caption_dropout must lie in [0, 1), got {recipe.data.caption_dropout}")
    for key in ("max_steps", "log_every", "checkpoint_every", "keep_last"):
        if getattr(recipe.train, key) < 1:
            raise RecipeError(f"train.{key} must be at least 1, got {getattr(recipe.train, key)}")
    if recipe.data.batch_size < 1:
        raise RecipeError(f"data.batch_size must be at least 1, got {recipe.data.batch_size}")
