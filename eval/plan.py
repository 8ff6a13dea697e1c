"""What an evaluation will do, decided and checked before any sampling: the first step of the suite.

`make_plan(SuiteConfig)` checks the model folders and every setting, pairs teachers with styles,
resolves prompts, seeds and sampling settings, and lists the image sets. Anything wrong here
fails in seconds with a message naming the setting, never after hours of generation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dmm.sampling import SamplingError, check_sampling, consecutive_seeds
from eval.features import FeatureConfig
from eval.generate import ImageSet, SamplingConfig, check_merged_folder, check_pipeline_folder, load_prompts

__all__ = ["Plan", "SuiteConfig", "make_plan", "paired_sets", "recipe_toyworld", "teachers_from_recipe"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLING_FLAGS = {"steps": "--steps", "guidance_scale": "--guidance-scale", "batch_size": "--batch-size"}


REF_SEED = 1_000_000  # the teacher reference batch's first seed, far from the sample seeds (the demo's too)


@dataclass
class SuiteConfig:
    merged: str
    teachers: dict[str, str]  # name -> pipeline folder; paired with the merged model's styles by name
    out: str
    cache: str | None = None  # default: <out>/cache
    prompts: str | None = None  # a text file, one caption per line; None: the toy world's prompts
    num_samples: int = 64  # per set (FID is biased at small n: compare only at equal n)
    seed: int = 0  # merged and teacher batches: seeds seed .. seed+n-1
    ref_seed: int = REF_SEED  # teacher reference batch: ref_seed .. ref_seed+n-1
    reference: bool = True  # sample the reference batch and compute M_ref
    # None: the paper's settings, or in toy mode (toy prompts) the toy world's steps and CFG with no
    # negative prompt (its words are outside the toy vocabulary); overrides apply on top of either
    sampling: SamplingConfig | None = None
    sampling_overrides: dict = field(default_factory=dict)
    features: FeatureConfig = field(default_factory=lambda: FeatureConfig(name="auto"))
    metrics: list[str] | None = None  # registered metric names; None: eval.metrics.DEFAULT_METRICS
    metric_options: dict[str, dict] = field(default_factory=dict)  # metric name -> its options mapping
    plugins: list[str] = field(default_factory=list)  # modules / .py files imported first (they register)
    toyworld: str = "assets/toyworld"
    grid_images: int = 8
    interpolate: tuple[str, str] | None = None
    interp_prompts: int = 2
    interp_samples: int = 8  # images per weight for the mixing-smoothness curves (eval.smoothness)
    mix: list[str] | None = None  # Table 3: equal-weight mixture of these styles, scored
    baselines: dict[str, str] = field(default_factory=dict)  # e.g. a weight-merged model, scored
    progress: bool = True


# --------------------------------------------------------------------------- recipes
def _read_recipe(path) -> dict:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read recipe {p}: {type(exc).__name__}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _recipe_path(p: Path, value: str) -> str:
    """A relative recipe path as it resolves: from the current folder, the recipe's, or the repo root."""
    tp = Path(value)
    if tp.is_absolute() or tp.exists():
        return str(tp)
    for root in (p.parent, REPO_ROOT):
        if (root / tp).exists():
            return str(root / tp)
    return str(tp)


def recipe_toyworld(path) -> str | None:
    """The toy world a recipe trains on (``data.toyworld.world``), if any."""
    data = _read_recipe(path).get("data") or {}
    toy = data.get("toyworld") if isinstance(data, dict) else None
    world = toy.get("world") if isinstance(toy, dict) else None
    return _recipe_path(Path(path), str(world)) if world else None


def teachers_from_recipe(path) -> dict[str, str]:
    """``teachers:`` list of ``{name, path}`` from a recipe YAML; relative paths are tried from the
    current folder, then the recipe's folder, then the repository root."""
    p = Path(path)
    data = _read_recipe(p)
    items = data.get("teachers")
    if not isinstance(items, list) or not items:
        raise ValueError(f"recipe {p} has no 'teachers:' list of {{name: ..., path: ...}}")
    out = {}
    for t in items:
        if not isinstance(t, dict) or "name" not in t or "path" not in t:
            raise ValueError(f"recipe {p}: each teacher needs 'name' and 'path', got {t!r}")
        out[str(t["name"])] = _recipe_path(p, str(t["path"]))
    return out


# --------------------------------------------------------------------------- checks
def load_world(path):
    """(world, None), or (None, the reason) when the toy world cannot be loaded."""
    try:
        from dmm.toyworld import load_world as _load
    except ImportError as exc:
        return None, f"dmm.toyworld is not importable ({exc})"
    try:
        return _load(path), None
    except Exception as exc:  # a half-built world folder
        return None, f"cannot load the toy world at {path}: {type(exc).__name__}: {exc}"


def _pair_styles(style_names: list[str], teachers: dict[str, str]) -> tuple[list[str], list[str], str]:
    """Teachers ordered like the styles: by name when they match, else by position (recorded)."""
    names = list(teachers)
    if sorted(names) == sorted(style_names):
        return list(style_names), list(style_names), "by name"
    if len(names) == len(style_names):
        return list(style_names), names, "by position (teacher names differ from style names)"
    raise ValueError(f"the merged model has {len(style_names)} styles {style_names} but {len(names)} teachers "
                     f"were given {names}: give one teacher per style (names matching the styles)")


def _check_counts(cfg: SuiteConfig, style_names: list[str]) -> None:
    if cfg.num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2 (a covariance needs 2 samples), got {cfg.num_samples}")
    for value, flag in ((cfg.grid_images, "--grid-images"), (cfg.interp_prompts, "--interp-prompts"),
                        (cfg.interp_samples, "--interp-samples")):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if cfg.mix is not None and (len(cfg.mix) < 2 or any(s not in style_names for s in cfg.mix)):
        raise ValueError(f"--mix needs at least two styles of {style_names}, got {cfg.mix}")
    for s in cfg.interpolate or ():
        if s not in style_names:
            raise ValueError(f"--interpolate: unknown style {s!r}; the merged model has {style_names}")


def _resolve_sampling(cfg: SuiteConfig, toy_world) -> tuple[SamplingConfig, str]:
    if cfg.sampling is not None:
        base, source = cfg.sampling, "given"
    elif toy_world is not None:
        toy = dict(getattr(toy_world, "sampling", {}) or {})
        base = SamplingConfig(steps=int(toy.get("num_inference_steps", 25)),
                              guidance_scale=float(toy.get("guidance_scale", 7.0)), negative_prompt="")
        source = "toy world defaults (world.json sampling, no negative prompt)"
    else:
        base, source = SamplingConfig(), "paper defaults (DPM-Solver++, 25 steps, CFG 7, its negative prompt)"
    merged = {**asdict(base), **cfg.sampling_overrides}
    try:
        check_sampling(merged["steps"], merged["guidance_scale"], merged["batch_size"], SAMPLING_FLAGS)
    except SamplingError as exc:
        raise ValueError(str(exc)) from None
    for key in ("height", "width"):
        if merged[key] is not None and (merged[key] < 8 or merged[key] % 8):
            raise ValueError(f"--{key} must be a positive multiple of 8 (the VAE downsamples by 8), got {merged[key]}")
    if cfg.sampling_overrides:
        base = SamplingConfig(**merged)
        source += f"; overridden: {', '.join(sorted(cfg.sampling_overrides))}"
    return base, source


# --------------------------------------------------------------------------- the plan
def paired_sets(merged: str, teachers: dict[str, str], styles: list[str], prompts: list[str],
                seeds: list[int], teacher_label: str = "teacher") -> tuple[list[ImageSet], list[ImageSet]]:
    """Per style, the merged model in that style and its teacher, on the same prompts and seeds."""
    merged_sets = [ImageSet(f"merged/{s}", merged, "merged", s, prompts, seeds) for s in styles]
    teacher_sets = [ImageSet(f"{teacher_label}/{t}", teachers[t], "teacher", None, prompts, seeds) for t in teachers]
    return merged_sets, teacher_sets


@dataclass
class Plan:
    """Everything the generate, metric and report steps need, decided up front."""

    cfg: SuiteConfig
    style_names: list[str]  # every style of the merged model
    styles: list[str]  # FID rows, in order
    teacher_order: list[str]  # FID columns, paired with `styles`
    pairing: str
    world: object | None
    world_reason: str | None
    prompts: list[str]
    prompt_source: str
    seeds: list[int]
    ref_seeds: list[int]
    sampling: SamplingConfig
    sampling_source: str
    features: FeatureConfig
    merged_sets: list[ImageSet]
    teacher_sets: list[ImageSet]
    ref_sets: list[ImageSet]
    extra_sets: list[ImageSet]

    @property
    def all_sets(self) -> list[ImageSet]:
        return self.merged_sets + self.teacher_sets + self.ref_sets + self.extra_sets

    @property
    def scored_sets(self) -> list[ImageSet]:
        return self.merged_sets + self.teacher_sets + self.extra_sets


def _feature_config(cfg: SuiteConfig, world, world_reason, device: str) -> FeatureConfig:
    fcfg = replace(cfg.features)
    if fcfg.name == "auto":
        if fcfg.weights:
            fcfg.name = "inception"
        elif world is not None:
            fcfg.name = "toyworld"
        else:
            raise ValueError("no FID feature network: pass --inception-weights FILE "
                             f"(pt_inception-2015-12-05-6726825d.pth) or --features NAME ({world_reason})")
    fcfg.toyworld = cfg.toyworld
    fcfg.device = device
    return fcfg


def make_plan(cfg: SuiteConfig) -> Plan:
    """Check everything that can be checked without sampling and list the image sets."""
    style_names = check_merged_folder(cfg.merged)
    if not cfg.teachers:
        raise ValueError("no teachers given: use --teacher NAME=PATH (repeatable) or --teachers-from-recipe")
    for name, path in cfg.teachers.items():
        check_pipeline_folder(path, f"teacher {name!r}")
    for name, path in cfg.baselines.items():
        check_pipeline_folder(path, f"baseline {name!r}")
    styles, teacher_order, pairing = _pair_styles(style_names, cfg.teachers)
    _check_counts(cfg, style_names)

    world, world_reason = None, None
    if cfg.prompts is None or cfg.features.name in ("auto", "toyworld") or \
            (cfg.metric_options.get("clip_score") or {}).get("model") is None:
        world, world_reason = load_world(cfg.toyworld)
    if cfg.prompts is not None:
        pool, prompt_source = load_prompts(cfg.prompts), str(cfg.prompts)
    elif world is not None:
        pool = list(world.prompts(cfg.num_samples, cfg.seed))
        prompt_source = f"toy world {cfg.toyworld} prompts(n={cfg.num_samples}, seed={cfg.seed})"
    else:
        raise ValueError(f"no prompts: pass --prompts FILE (one caption per line); the toy default failed: {world_reason}")
    sampling, sampling_source = _resolve_sampling(cfg, world if cfg.prompts is None else None)
    prompts = [pool[k % len(pool)] for k in range(cfg.num_samples)]
    seeds = consecutive_seeds(cfg.seed, cfg.num_samples)
    ref_seeds = consecutive_seeds(cfg.ref_seed, cfg.num_samples)

    teachers = {t: cfg.teachers[t] for t in teacher_order}
    merged_sets, teacher_sets = paired_sets(cfg.merged, teachers, styles, prompts, seeds)
    ref_sets = paired_sets(cfg.merged, teachers, [], prompts, ref_seeds, "teacher-ref")[1] if cfg.reference else []
    extra_sets = []
    if cfg.mix:
        weights = {s: 1.0 / len(cfg.mix) for s in cfg.mix}
        extra_sets.append(ImageSet(f"merged/mix({'+'.join(cfg.mix)})", cfg.merged, "merged", weights, prompts, seeds))
    extra_sets += [ImageSet(f"baseline/{n}", p, "teacher", None, prompts, seeds) for n, p in cfg.baselines.items()]
    return Plan(cfg, style_names, styles, teacher_order, pairing, world, world_reason, prompts, prompt_source, seeds,
                ref_seeds, sampling, sampling_source, _feature_config(cfg, world, world_reason, sampling.device),
                merged_sets, teacher_sets, ref_sets, extra_sets)
