"""Dry run: will a recipe fit in each GPU's memory, and if not, which switch makes it fit.

    python launchers/train.py --recipe recipes/sdxl_4.yaml --dry-run --gpus 8 --gpu-memory 80GiB

Every model is built on the meta device (configs only, no weights are read). Where the recipe's
base folder is not on disk, the standard configuration of `model.arch` (dmm.models.arch) stands
in, and the report says so. Per rank it adds up, in bytes:
- the trained models (the student; the discriminator when the objective trains one,
  `Objective.memory_parts`) as the engine holds them: weights, fp32 master
  weights, gradients and AdamW's two fp32 states, each divided by the world size where the
  engine shards it (DeepSpeed ZeRO 1/2/3, optional optimizer offload to the host; FSDP2), plus
  the engine's working buffers and bf16 weight copies under autocast;
- this rank's supervisors in `model.teacher_dtype`: the layout (dmm.train.layout) spreads the objective's
  slots (`Objective.slot_names`: the teachers, then e.g. the incremental objective's frozen copy of
  `model.init_from`, sized from that folder's config when it is on disk) over the ranks;
- the frozen base parts the trainer keeps on the device (text encoders and VAE, fp32);
- weight averages of the student, each a whole fp32 copy: the objective's target networks on every
  rank (SPLAM's, forwarded without grad between the student's forward and backward) and
  `optim.ema_decay`'s on the main rank only; under ZeRO-3 / FSDP2 their update gathers the
  student on every rank after each step, one parameter at a time;
- activations: per-sample figures MEASURED on a CPU for the full-size SD1.5 / SDXL UNets
  (MEASURED below, with the command that made them) scaled to the recipe's latent size by the
  number of latent pixels (a line through the measured points: a per-sample constant plus a part
  proportional to the pixels). A UNet of any other shape (the toy world, tests) is small enough to
  be measured now, the same way, at the recipe's own resolution.
A micro-step passes through phases (VAE encode, teacher forward, student forward/backward with
the frozen discriminator, target forward, discriminator update, optimizer step, weight-average
update); the peak is the resident part plus the largest phase. Everything is an estimate of the allocator's live bytes: leave headroom
for fragmentation and the CUDA context (about 1 GiB), which are not counted.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dmm.data.buckets import largest_side
from dmm.models.arch import (
    Arch,
    block_output_shapes,
    detect_arch,
    feature_blocks,
    standard_components,
    vae_scale_factor,
)
from dmm.recipes import Recipe
from dmm.train.layout import TeacherLayout

GiB = 2**30
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
TOKENS = 77  # caption tokens of the cross-attention input (CLIP's context length)

# Per-sample memory of the parts of a micro-step, MEASURED on this project's 2-core CPU machine
# (shared, 2026-12-02, torch 2.13.0+cpu, random weights) with benchmarks/activation_memory.py:
#   .venv/bin/python benchmarks/activation_memory.py --arch ARCH --latent 16|32 --width-divisor 8 \
#       --parts PART --precision bf16 [--checkpointing on|off] [--forward-only]
# as the rise of the process's peak resident set over its level before the step, at batch 2 minus
# batch 1 after a warm-up step (parameter gradients dropped as they arrive). The UNets are the
# real SD1.5 / SDXL block structure (blocks, depth, heads, resolution) with every channel count
# divided by 8 (full size did not fit next to other jobs in this machine's 24 GiB, nor in its time):
# every activation is as wide as its block, so the figure x 8 is the full-size one (what is stored).
# Parts: student = fwd+bwd with feature hooks and losses (bf16 autocast; gradient checkpointing on,
# or off measured --forward-only: the peak at the end of forward, every saved activation alive);
# disc = discriminator forward for its update, disc_frozen = the generator loss's pass (gradient to
# the input only), both --forward-only without activation checkpointing, fwd+bwd with it (--checkpointing
# on: the peak is in backward, one block recomputed at a time; measured 2026-12-02 03:40, shared machine,
# in the same run as a re-measurement without it that came within 7% of the stored figures at latent 32);
# teacher = no-grad forward; vae = full-size VAE encode (fp32).
# Keys: (arch, part, precision, gradient checkpointing); values: {latent side: bytes per sample},
# scaled to other latent sizes by the number of latent pixels (`per_sample`).
MEASURED: dict[tuple[str, str, str, bool | None], dict[int, int]] = {
    ("sd15", "student", "bf16", False): {16: 355_794_944, 32: 449_708_032},  # fwd+bwd
    ("sd15", "student", "bf16", True): {16: 256_442_368, 32: 258_801_664},  # fwd+bwd
    ("sd15", "disc", "bf16", False): {16: 162_856_960, 32: 221_609_984},
    ("sd15", "disc_frozen", "bf16", False): {16: 24_969_216, 32: 81_264_640},
    ("sd15", "teacher", "bf16", None): {16: 137_756_672},
    ("sdxl", "teacher", "bf16", None): {16: 96_370_688},
    ("sdxl", "student", "bf16", False): {16: 577_830_912, 32: 929_267_712},  # forward only
    ("sdxl", "student", "bf16", True): {16: 107_020_288, 32: 247_562_240},  # fwd+bwd
    ("sdxl", "disc", "bf16", False): {16: 311_328_768, 32: 482_869_248},
    ("sdxl", "disc_frozen", "bf16", False): {16: 73_138_176, 32: 285_016_064},
    ("sdxl", "disc", "bf16", True): {16: 90_374_144, 32: 98_631_680},  # fwd+bwd
    ("sdxl", "disc_frozen", "bf16", True): {16: 94_175_232, 32: 141_000_704},  # fwd+bwd
    ("sd15", "vae", "fp32", None): {16: 63_135_744},  # full size; SDXL's VAE is the same network
}

# Foreach AdamW (the default on a GPU) allocates one temporary as large as the exp_avg_sq states.
ADAM_STATE_BYTES = 8
# DeepSpeed ZeRO defaults (deepspeed.runtime.zero.config): reduce bucket 5e8 elements, stage 3
# prefetch bucket 5e7 elements.
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000


class DryRunError(ValueError):
    """A dry run that cannot be made as asked; the message says what to change."""


# What `Objective.memory_parts` may say; see its docstring.
PARTS = ("discriminator", "teacher_features", "teacher_calls", "target_networks", "student_rows")


def memory_parts(recipe: Recipe) -> dict:
    """The recipe's objective's `memory_parts` over the base class's defaults (a plugin objective may
    name only what differs); a key the dry run does not size is refused."""
    from dmm.objectives import Objective, objective_class

    cls, options = objective_class(recipe)
    parts = {**Objective.memory_parts(recipe, options), **cls.memory_parts(recipe, options)}
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise DryRunError(f"objective {recipe.objective.name!r}: memory_parts names {unknown}, which the dry run "
                          f"does not size (it knows {list(PARTS)}): add them to dmm.train.dryrun")
    return parts


def parse_memory(text: str) -> int:
    """'80GiB', '80 GB', '81920MiB' -> bytes. A unit is required (GiB and GB differ by 7%)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", str(text))
    known = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
    if not m:
        raise DryRunError(f"--gpu-memory {text!r} is not a size: write a number and a unit ({known}), e.g. 80GiB")
    number, unit = float(m.group(1)), m.group(2)
    if not unit:
        raise DryRunError(f"--gpu-memory {text!r} has no unit: write e.g. {m.group(1)}GiB (units: {known})")
    if unit.lower() not in UNITS:
        raise DryRunError(f"--gpu-memory {text!r}: unknown unit {unit!r}; use one of {known} (e.g. 80GiB)")
    if number <= 0:
        raise DryRunError(f"--gpu-memory {text!r} must be positive")
    return int(number * UNITS[unit.lower()])


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- models on the meta device
@dataclass
class Models:
    """Parameter counts of every model of a run, built on the meta device from configs."""

    arch: Arch
    source: str
    unet_config: dict
    vae_factor: int
    student: int
    teacher: int
    disc: int
    frozen: dict[str, int]
    largest_unit: dict[str, int]  # FSDP2's largest sharding unit (one UNet block) per trained model
    standard: bool  # the full-size SD1.5/SDXL UNet (measured figures apply)
    slots: list[str] = field(default_factory=list)  # the supervisors the layout distributes (objective.slot_names)
    extra: dict[str, int] = field(default_factory=dict)  # the objective's own supervisors beyond the teachers
    largest_param: int = 0  # the student's largest parameter (a weight average gathers one at a time)


def _class(library: str, name: str):
    return getattr(importlib.import_module(library), name)


def _meta_build(library: str, name: str, config: dict):
    import torch

    cls = _class(library, name)
    with torch.device("meta"):
        if library == "transformers":
            return cls(cls.config_class(**config))
        return cls(**config)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    except (OSError, json.JSONDecodeError) as err:
        raise DryRunError(f"cannot read {path} ({err}); the base folder looks incomplete") from None


def _components(recipe: Recipe) -> tuple[str, dict[str, tuple[str, str, dict]]]:
    """(where the configs came from, {component: (library, class, config)}) of the base pipeline."""
    base = Path(recipe.model.base) if recipe.model.base else None
    if base is not None and (base / "model_index.json").is_file():
        index = json.loads((base / "model_index.json").read_text())
        parts = {}
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            entry = index.get(name)
            if isinstance(entry, list) and entry[0] and entry[1]:
                parts[name] = (entry[0], entry[1], _read_config(base / name))
        if "unet" not in parts:
            raise DryRunError(f"base folder {base} names no UNet in model_index.json")
        return f"configs of the base folder {base} (no weights read)", parts
    if recipe.model.arch == "auto":
        raise DryRunError(f"the base folder {recipe.model.base!r} is not on disk and model.arch is auto: set "
                          "model.arch to sd15 or sdxl (--set model.arch=sdxl) to size the standard architecture")
    libraries = {"UNet2DConditionModel": "diffusers", "AutoencoderKL": "diffusers"}
    parts = {name: (libraries.get(cls, "transformers"), cls, cfg)
             for name, (cls, cfg) in standard_components(recipe.model.arch).items()}
    return (f"the base folder {recipe.model.base!r} is not on disk: the standard {recipe.model.arch} "
            "configuration (dmm.models.arch.standard_components)"), parts


_STANDARD_FIELDS = ("block_out_channels", "layers_per_block", "transformer_layers_per_block", "cross_attention_dim",
                    "down_block_types", "up_block_types", "attention_head_dim", "in_channels")


def _is_standard(arch: Arch, config: dict) -> bool:
    reference = standard_components(arch.name)["unet"][1]

    def norm(v):
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v

    defaults = {"transformer_layers_per_block": 1, "in_channels": 4}
    return all(norm(config.get(k, defaults.get(k))) == norm(reference.get(k, defaults.get(k)))
               for k in _STANDARD_FIELDS)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_models(recipe: Recipe) -> Models:
    """Every model of the run on the meta device: student, one teacher, discriminator, frozen parts."""
    from dmm.models.discriminator import MultiClassDiscriminator
    from dmm.models.student import StyleUNet2DConditionModel
    from dmm.objectives import student_config

    source, parts = _components(recipe)
    unet_cfg = parts["unet"][2]
    arch = detect_arch(unet_cfg)
    if recipe.model.arch != "auto" and recipe.model.arch != arch.name:
        raise DryRunError(f"model.arch is {recipe.model.arch!r} but the base UNet config is {arch.name}")
    import torch

    teacher = _meta_build(*parts["unet"])
    slots, styles, extra_cfg, where = _objective_slots(recipe, unet_cfg)
    with torch.device("meta"):
        # the objective's own inputs (SPLAM's timestep_cond projection), as the trainer builds the student
        student = StyleUNet2DConditionModel(**{**unet_cfg, **student_config(recipe)}, style_names=styles)
        disc = MultiClassDiscriminator(teacher, len(styles))
        extra = {name: _numel(StyleUNet2DConditionModel(**extra_cfg)) for name in slots[len(recipe.teachers):]}
    frozen = {name: _numel(_meta_build(*spec)) for name, spec in parts.items() if name != "unet"}
    vae_cfg = parts["vae"][2] if "vae" in parts else {"block_out_channels": (0,) * 4}
    return Models(arch=arch, source=source + (f"; {where}" if extra else ""), unet_config=unet_cfg,
                  vae_factor=vae_scale_factor(vae_cfg),
                  student=_numel(student), teacher=_numel(teacher), disc=_numel(disc), frozen=frozen,
                  largest_unit={"student": max(_numel(b) for b in feature_blocks(student).values()),
                                "disc": max(_numel(b) for b in feature_blocks(disc.encoder).values())},
                  standard=_is_standard(arch, unet_cfg), slots=slots, extra=extra,
                  largest_param=max(p.numel() for p in student.parameters()))


def supervisor_slots(recipe: Recipe) -> list[str]:
    """The supervisors the rank layout distributes: the teachers, then the objective's own (the
    incremental objective's frozen previous student), as the trainer lays them out."""
    from dmm.objectives import objective_class

    cls, options = objective_class(recipe)
    return cls.slot_names(recipe.style_names, recipe.model.init_from, options)


def _objective_slots(recipe: Recipe, unet_cfg: dict) -> tuple[list[str], list[str], dict, str]:
    """(slots, the student's style names, the config of the objective's extra supervisors, where that
    config came from). An extra supervisor is a frozen style UNet copied from `model.init_from`:
    its config is read from there when the folder is on disk (no weights), else the base UNet's
    config with a style codebook stands in (the old styles unknown: as many as the new ones)."""
    from dmm.objectives import student_style_names

    slots = supervisor_slots(recipe)
    init = Path(recipe.model.init_from) / "unet" / "config.json" if recipe.model.init_from else None
    if init is not None and init.is_file():
        cfg = _read_config(init.parent)
        try:
            styles = student_style_names(recipe)
        except (OSError, ValueError):
            styles = list(recipe.style_names)
        if cfg.get("style_names"):
            return slots, styles, cfg, f"the objective's frozen supervisor from the config of {init.parent}"
    cfg = {**unet_cfg, "style_names": list(recipe.style_names)}
    where = (f"model.init_from {recipe.model.init_from!r} is not a merged model on disk: the objective's frozen "
             f"supervisor is the base UNet config with {len(recipe.style_names)} style rows (the old styles' count "
             "is unknown)")
    return slots, list(recipe.style_names), cfg, where


# --------------------------------------------------------------------------- engines
@dataclass
class Held:
    """What an engine holds of one trained model on one rank (bytes)."""

    weights: int
    master: int = 0
    optimizer: int = 0
    grads: int = 0
    mp_copies: int = 0  # bf16 weight copies alive through forward/backward (autocast cache)
    working: int = 0  # engine buffers during forward/backward (buckets, gathered shards)
    step_temp: int = 0  # foreach AdamW's state-sized temporary during the step
    step_extra: int = 0  # other transients of the step (DeepSpeed's fp32 gradient partition)
    host: int = 0  # offloaded to the host's memory (not on the GPU)
    notes: list[str] = field(default_factory=list)


def _held_none(params: int, bf16: bool, world: int, options: dict, unit: int) -> Held:
    return Held(weights=4 * params, optimizer=ADAM_STATE_BYTES * params, grads=4 * params,
                mp_copies=2 * params if bf16 else 0, step_temp=4 * params, notes=["fp32, whole"])


def _held_deepspeed(params: int, bf16: bool, world: int, options: dict, unit: int) -> Held:
    stage = int(options.get("zero_stage", 2))
    offload = bool(options.get("offload_optimizer", False))
    wb = 2 if bf16 else 4
    shard = world if stage >= 1 else 1
    held = Held(weights=wb * params // (world if stage == 3 else 1),
                master=4 * params // shard if (bf16 or stage >= 1) else 0,
                optimizer=ADAM_STATE_BYTES * params // shard,
                grads=wb * params // (world if stage >= 2 else 1),
                notes=[f"ZeRO-{stage}" + (", optimizer offloaded" if offload else "")])
    held.step_temp = 4 * params // shard
    held.step_extra = 4 * params // shard if stage >= 2 else 0  # the partition's gradients cast to fp32
    if stage in (1, 2):
        held.working = wb * min(DS_REDUCE_BUCKET, params)
    elif stage == 3:
        held.working = wb * (min(DS_REDUCE_BUCKET, params) + min(DS_PREFETCH_BUCKET, params) + unit)
    if offload:
        held.host = held.master + held.optimizer + (4 * params // shard if stage >= 2 else 0)
        held.master = held.optimizer = held.step_temp = held.step_extra = 0
    return held


def _held_fsdp2(params: int, bf16: bool, world: int, options: dict, unit: int) -> Held:
    cb = 2 if bf16 else 4
    return Held(weights=4 * params // world, optimizer=ADAM_STATE_BYTES * params // world, grads=4 * params // world,
                # the unit being computed and the next one gathered, its unsharded gradient and fp32 reduce copy
                working=unit * (2 * cb + cb + 4), step_temp=4 * params // world,
                notes=["fp32 shards" + (", bf16 compute" if bf16 else "")])


# How each engine holds a trained model; an engine registered by a plugin without an entry here is
# sized like `none` (whole on every rank) and the report says so.
ENGINE_MEMORY = {"none": _held_none, "deepspeed": _held_deepspeed, "fsdp2": _held_fsdp2}


# --------------------------------------------------------------------------- activations
def per_sample(arch: str, part: str, precision: str, checkpointing: bool | None, latent: int) -> int:
    """MEASURED bytes per sample of a part, scaled to a square latent of side `latent`: through two
    measured sizes a line in the number of latent pixels (a per-sample constant + a part
    proportional to the pixels; at these small sizes the constant is large, so a purely
    proportional scaling would overstate 1024 px several times). A part measured at one size
    follows the line of the same UNet's student (its ratio between the two sizes)."""
    points = MEASURED[(arch, part, precision, checkpointing)]
    sides = sorted(points)
    if len(sides) == 1:  # the shape of a part of the same UNet measured at two sizes, else proportional
        shape = next((k for k in ((arch, part, precision, not checkpointing), (arch, "student", precision, False))
                      if len(MEASURED.get(k, {})) > 1 and sides[0] in MEASURED[k]), None)
        if shape is not None:
            return int(points[sides[0]] * per_sample(*shape, latent) / MEASURED[shape][sides[0]])
        return int(points[sides[0]] * latent**2 / sides[0] ** 2)
    a, b = sides[0], sides[-1]
    slope = (points[b] - points[a]) / (b**2 - a**2)
    return max(0, int(points[a] + slope * (latent**2 - a**2)))


def _measured_archs() -> list[str]:
    return sorted({k[0] for k in MEASURED})


def _has_measured(arch: str) -> bool:
    return any(k[0] == arch for k in MEASURED)


def _figure(arch: str, part: str, precision: str, checkpointing: bool | None, latent: int, notes: list[str]) -> int:
    """A MEASURED figure; an fp32 one that was not measured is taken as twice the bf16 one (every
    saved activation twice as wide: an upper bound), and the report says so."""
    if (arch, part, precision, checkpointing) in MEASURED:
        return per_sample(arch, part, precision, checkpointing, latent)
    if precision == "fp32" and (arch, part, "bf16", checkpointing) in MEASURED:
        notes.append(f"{part}: no fp32 measurement, taken as twice the bf16 one")
        return 2 * per_sample(arch, part, "bf16", checkpointing, latent)
    if part in ("student", "disc", "disc_frozen") and (arch, part, precision, not checkpointing) in MEASURED:
        for other in _measured_archs():  # the ratio checkpointing on/off of an architecture measured both ways
            on, off = (other, part, precision, True), (other, part, precision, False)
            if on in MEASURED and off in MEASURED:
                ratio = per_sample(*on, latent) / max(1, per_sample(*off, latent))
                notes.append(f"{part} with gradient checkpointing {'on' if checkpointing else 'off'}: not measured "
                             f"for {arch}, taken from its other setting by {other}'s ratio")
                known = per_sample(arch, part, precision, not checkpointing, latent)
                return int(known * ratio if checkpointing else known / ratio)
    if part == "vae":  # SD1.5 and SDXL share the VAE's architecture
        for key in MEASURED:
            if key[1] == "vae":
                return per_sample(*key, latent)
    if part in ("teacher", "vae"):
        notes.append(f"{part}: not measured, its transient is not counted")
        return 0
    raise DryRunError(f"no measured figure for {arch} {part} ({precision}"
                      + ("" if checkpointing is None else f", gradient checkpointing {checkpointing}")
                      + "): measure it with benchmarks/activation_memory.py and add it to dmm.train.dryrun.MEASURED")


@dataclass
class Activations:
    """Bytes per sample of each part at the recipe's latent size, and where they came from."""

    student: int
    student_other: int | None  # with gradient checkpointing switched the other way (None: not measured)
    disc: int
    disc_frozen: int
    teacher: int
    vae: int
    features: int  # one batch-sized copy of the teachers' fp32 block outputs, per sample
    source: str
    target: int = 0  # a target network's no-grad forward (the student's shape, mixed precision)


def _status(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {name}")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rise(step) -> int:
    """Bytes by which this process's resident set peaks above its level just before `step()`
    (Linux: /proc/self/clear_refs resets the peak; freed heap is returned first)."""
    _trim()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    peak = _status("VmHWM")
    _trim()
    return max(0, peak - before)


def _tokens(recipe: Recipe) -> int:
    """Caption tokens of the cross-attention input: the base tokenizer's length, else CLIP's 77."""
    path = Path(recipe.model.base) / "tokenizer" / "tokenizer_config.json"
    try:
        length = int(json.loads(path.read_text()).get("model_max_length", TOKENS))
    except (OSError, ValueError, TypeError):
        return TOKENS
    return length if 0 < length <= 4096 else TOKENS


def measure_now(recipe: Recipe, models: Models, latent: int, checkpointing: bool) -> dict[str, int]:
    """Per-sample bytes of each part of a micro-step for a (small) UNet of any shape, measured in
    this process on the CPU at the recipe's latent size: batch 2 minus batch 1, after a warm-up.
    Random weights; nothing is read. Used for UNets without MEASURED figures (toy world, tests)."""
    import contextlib

    import torch

    from dmm.losses import discriminator_loss, feature_imitation_loss, generator_loss, score_distillation_loss
    from dmm.models.discriminator import MultiClassDiscriminator
    from dmm.models.features import BlockFeatures
    from dmm.models.student import StyleUNet2DConditionModel

    cfg, arch, n = models.unet_config, models.arch, len(recipe.style_names)
    tokens = _tokens(recipe)
    bf16 = recipe.train.mixed_precision == "bf16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def inputs(batch: int):
        g = torch.Generator().manual_seed(batch)
        kwargs = {}
        if arch.uses_text_time:
            pooled = cfg["projection_class_embeddings_input_dim"] - arch.time_ids * cfg["addition_time_embed_dim"]
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                           "time_ids": torch.rand(batch, arch.time_ids, generator=g) * 64}
        return (torch.randn(batch, cfg.get("in_channels", 4), latent, latent, generator=g),
                torch.randint(0, 1000, (batch,), generator=g),
                torch.randn(batch, tokens, cfg["cross_attention_dim"], generator=g), kwargs)

    def slope(run) -> int:
        run(1)
        return max(0, peak_rise(lambda: run(2)) - peak_rise(lambda: run(1)))

    torch.manual_seed(0)
    student = StyleUNet2DConditionModel(**cfg, style_names=recipe.style_names).train()
    for p in student.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    out = {}
    for ckpt in (checkpointing, not checkpointing):
        if ckpt:
            student.enable_gradient_checkpointing()
        else:
            student.disable_gradient_checkpointing()

        def run_student(batch, targets):
            x, t, ehs, kw = inputs(batch)
            styles = torch.arange(batch) % n
            with autocast(), BlockFeatures(student) as rec:
                pred = student(x, t, ehs, class_labels=styles, **kw).sample
            loss = score_distillation_loss(pred, targets["out"]) + feature_imitation_loss(rec.outputs, targets["feats"])
            loss.backward()

        # The teacher's outputs exist before the student's step (counted as `features`): made outside.
        targets = {b: {"out": torch.zeros(b, cfg.get("out_channels", 4), latent, latent),
                       "feats": {k: torch.zeros(b, *shape) for k, shape in block_output_shapes(cfg, latent).items()}}
                   for b in (1, 2)}
        out["student" if ckpt == checkpointing else "student_other"] = slope(lambda b: run_student(b, targets[b]))
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel(**cfg)
    disc = MultiClassDiscriminator(base, n).train()
    if checkpointing:  # the trainer checkpoints the discriminator with the student (train.gradient_checkpointing)
        disc.enable_gradient_checkpointing()
    for p in disc.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))

    def run_disc(batch, frozen):
        x, t, ehs, kw = inputs(batch)
        styles = torch.arange(batch) % n
        disc.requires_grad_(not frozen)
        x.requires_grad_(frozen)
        with autocast():
            logits = disc(x, t, ehs, **kw)
        loss = generator_loss(logits, styles, n) if frozen else discriminator_loss(logits, logits.detach(), styles, n)
        loss.backward()

    out["disc"] = slope(lambda b: run_disc(b, False))
    out["disc_frozen"] = slope(lambda b: run_disc(b, True))
    dtype = torch.bfloat16 if recipe.model.teacher_dtype == "bfloat16" else torch.float32
    torch.nn.Module.to(base, dtype).requires_grad_(False)  # (diffusers' own .to warns about fp32 modules)

    def run_teacher(batch):
        x, t, ehs, kw = inputs(batch)
        kw = {k: {m: v.to(dtype) for m, v in a.items()} for k, a in kw.items()}
        with torch.no_grad(), BlockFeatures(base, detach=True):
            base(x.to(dtype), t, ehs.to(dtype), **kw)

    out["teacher"] = slope(run_teacher)
    out["vae"] = _measure_vae_now(recipe, latent, slope)
    return out


def _measure_vae_now(recipe: Recipe, latent: int, slope) -> int:
    import torch

    _, parts = _components(recipe)
    if "vae" not in parts:
        return 0
    library, name, cfg = parts["vae"]
    vae = _class(library, name)(**cfg).requires_grad_(False)
    side = latent * vae_scale_factor(cfg)

    def run(batch):
        with torch.no_grad():
            vae.encode(torch.randn(batch, cfg.get("in_channels", 3), side, side)).latent_dist.mode()

    return slope(run)


def _optional(figure):
    try:
        return figure()
    except DryRunError:
        return None


def activations(recipe: Recipe, models: Models) -> Activations:
    latent = -(-largest_side(recipe) // models.vae_factor)  # buckets: the square of the largest one's area
    ckpt = recipe.train.gradient_checkpointing
    precision = "bf16" if recipe.train.mixed_precision == "bf16" else "fp32"
    teacher_precision = "bf16" if recipe.model.teacher_dtype == "bfloat16" else "fp32"
    features = 0
    parts = memory_parts(recipe)
    if parts["teacher_features"]:  # the teacher's block outputs, kept in fp32 for the whole micro-step
        features = 4 * sum(c * h * w for c, h, w in block_output_shapes(models.unet_config, latent).values())
    target = bool(parts["target_networks"])
    name = models.arch.name
    if models.standard and _has_measured(name):
        notes: list[str] = []
        act = Activations(
            student=_figure(name, "student", precision, ckpt, latent, notes),
            student_other=_optional(lambda: _figure(name, "student", precision, not ckpt, latent, [])),
            disc=_figure(name, "disc", precision, ckpt, latent, notes),
            disc_frozen=_figure(name, "disc_frozen", precision, ckpt, latent, notes),
            teacher=_figure(name, "teacher", teacher_precision, None, latent, notes),
            vae=_figure(name, "vae", "fp32", None, latent, notes),
            features=features,
            target=_figure(name, "teacher", precision, None, latent, notes) if target else 0,
            source=f"measured figures of the full-size {name} UNet (dmm.train.dryrun.MEASURED) scaled to the "
                   f"{latent}x{latent} latent along a line in the latent pixel count" + "".join(f"; {n}" for n in notes))
        return act
    if models.student > 200_000_000:
        raise DryRunError(f"no measured activation figures for this {name} UNet ({models.student / 1e6:.0f}M "
                          "parameters, not the standard configuration) and it is too large to measure now: "
                          "measure it with benchmarks/activation_memory.py and add it to MEASURED")
    m = measure_now(recipe, models, latent, ckpt)
    # A target network is the teachers' shape forwarded without grad: a teacher's figure, twice when
    # the run computes in fp32 and the teachers in bf16 (the forward alone measured too small to see here).
    widen = 2 if precision == "fp32" and teacher_precision == "bf16" else 1
    return Activations(student=m["student"], student_other=m["student_other"], disc=m["disc"],
                       disc_frozen=m["disc_frozen"], teacher=m["teacher"], vae=m["vae"], features=features,
                       target=widen * m["teacher"] if target else 0,
                       source=f"measured now on this CPU at the {latent}x{latent} latent (a small UNet without "
                              "stored figures)")


# --------------------------------------------------------------------------- the plan
@dataclass
class RankPlan:
    ranks: list[int]
    teachers: dict[int, list[str]]  # rank -> the supervisors it holds (teachers, the objective's own)
    resident: list[tuple[str, int]]
    phases: dict[str, int]
    host: int

    @property
    def resident_bytes(self) -> int:
        return sum(b for _, b in self.resident)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self) -> int:
        return self.resident_bytes + self.phases[self.peak_phase]


@dataclass
class Plan:
    recipe: Recipe
    gpus: int
    budget: int
    models: Models
    act: Activations
    ranks: list[RankPlan]
    layout: str
    notes: list[str]
    device: str = "cuda"

    @property
    def peak(self) -> int:
        return max(r.peak for r in self.ranks)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget


def plan(recipe: Recipe, gpus: int, budget: int, *, models: Models | None = None,
         act: Activations | None = None, device: str = "cuda") -> Plan:
    """The memory plan of every rank of `recipe` on `gpus` devices of `budget` bytes. `device`
    "cpu" sizes a CPU run (the checks against measured runs): AdamW steps tensor by tensor there,
    without foreach's state-sized temporary."""
    engine = recipe.distributed.engine
    if gpus < 1:
        raise DryRunError(f"--gpus must be at least 1, got {gpus}")
    if engine == "none" and gpus > 1:
        raise DryRunError(f"distributed.engine is 'none' (one process) but --gpus is {gpus}: use --gpus 1, or "
                          "--set distributed.engine=deepspeed (or fsdp2)")
    models = models or build_models(recipe)
    act = act or activations(recipe, models)
    slots = models.slots or [t.name for t in recipe.teachers]
    n_teachers = len(recipe.teachers)
    notes = [models.source, f"activations: {act.source}"]
    accum = recipe.distributed.grad_accum_steps
    try:
        layout = TeacherLayout(gpus, len(slots), accum)
    except ValueError as err:
        raise DryRunError(str(err)) from None
    if engine not in ENGINE_MEMORY:
        notes.append(f"engine {engine!r} has no memory model here: sized like 'none' (every model whole on every rank)")
    held_of = ENGINE_MEMORY.get(engine, _held_none)
    options = dict(recipe.distributed.options)
    bf16 = recipe.train.mixed_precision == "bf16"
    parts = memory_parts(recipe)
    use_adv = parts["discriminator"]
    targets = list(parts["target_networks"])
    average = recipe.optim.ema_decay > 0  # optim.ema_decay: the main rank's average, for export
    student = held_of(models.student, bf16, gpus, options, models.largest_unit["student"])
    disc = None
    if use_adv:
        disc_options = dict(options)
        if engine == "deepspeed" and int(options.get("zero_stage", 2)) == 3:
            disc_options["zero_stage"] = 2  # the engine keeps the discriminator whole (FrozenAwareCall)
        disc = held_of(models.disc, bf16, gpus, disc_options, models.largest_unit["disc"])
    if device != "cuda" or _fused_adamw(recipe, device):
        for held in (student, disc):  # CPU: AdamW steps tensor by tensor; fused: no state-sized temporary
            if held is not None:
                held.step_temp = 0
    tbytes = 2 if recipe.model.teacher_dtype == "bfloat16" else 4
    precomputed = bool(getattr(recipe.data, "precomputed", ""))
    frozen = 0 if precomputed else 4 * sum(models.frozen.values())
    if precomputed:
        notes.append("data.precomputed: latents and text conditioning are read, no VAE or text encoder is held")
    if getattr(getattr(recipe, "perf", None), "attention", "sdpa") != "sdpa":
        notes.append("perf.attention is not sdpa: the activation figures were measured with sdpa (memory linear "
                     "in the pixels); explicit attention also holds the attention matrices, not counted here")
    if parts["teacher_calls"] > 1:
        notes.append(f"objective {recipe.objective.name}: each teacher is called {parts['teacher_calls']} times per "
                     "step without grad, one after another (the transient is one call's)")
    b = recipe.data.batch_size
    feats = parts["teacher_features"] * act.features
    # Every rank reads the full student after each step when any average is kept (the trainer's
    # keeps_ema): under ZeRO-3 (its bf16/fp32 weights) and FSDP2 (fp32) one parameter is gathered
    # at a time, on every rank, so the transient is the largest parameter.
    gather = 0
    if engine == "deepspeed" and int(options.get("zero_stage", 2)) == 3:
        gather = (2 if bf16 else 4) * models.largest_param
    elif engine == "fsdp2":
        gather = 4 * models.largest_param

    # Ranks holding the same number of teachers and the same objective supervisors need the same
    # memory; the main rank stands apart when it keeps optim.ema_decay's average.
    groups: dict[tuple[int, tuple[str, ...], bool], list[int]] = {}
    for rank in range(gpus):
        held = layout.teachers_for_rank(rank)
        key = (sum(i < n_teachers for i in held), tuple(slots[i] for i in held if i >= n_teachers),
               average and rank == 0)
        groups.setdefault(key, []).append(rank)
    ranks = []
    for (count, own, main), members in groups.items():
        teachers = range(count)
        resident = [(f"student weights ({student.notes[0]})", student.weights)]
        if student.master:
            resident.append(("student fp32 master weights", student.master))
        resident.append(("student AdamW states (fp32 exp_avg, exp_avg_sq)", student.optimizer))
        if disc is not None:
            resident.append((f"discriminator weights ({disc.notes[0]})", disc.weights))
            if disc.master:
                resident.append(("discriminator fp32 master weights", disc.master))
            resident.append(("discriminator AdamW states", disc.optimizer))
            if engine == "deepspeed":  # FrozenAwareCall: a whole copy for the generator loss's pass
                resident.append(("discriminator frozen replica (generator loss)", disc.weights))
        if count or not own:
            resident.append((f"teachers x{len(teachers)} ({recipe.model.teacher_dtype})", len(teachers) * tbytes
                             * models.teacher))
        for name in own:  # e.g. the incremental objective's frozen copy of the starting student
            resident.append((f"{name} (frozen supervisor of the objective, {recipe.model.teacher_dtype})",
                             tbytes * models.extra[name]))
        resident.append((f"frozen base parts ({', '.join(models.frozen) or 'none'}; fp32)", frozen))
        for name in targets:  # the objective's target networks (emas() called in forward), every rank
            resident.append((f"{name} (target network: the student whole, fp32, every rank)", 4 * models.student))
        if main:
            resident.append(("student weight average (optim.ema_decay: the student whole, fp32, main rank only)",
                             4 * models.student))
        g_s = student.grads
        g_d = disc.grads if disc else 0
        prev = g_s + g_d if accum > 1 else 0
        mp = student.mp_copies + (disc.mp_copies if disc else 0)
        rows = parts["student_rows"]
        student_phase = (prev + mp + student.working
                         + b * (feats + rows * act.student + (act.disc_frozen if disc else 0)))
        phases = {
            "VAE encode": prev + (0 if precomputed else b * act.vae),
            "teacher forward": prev + b * (feats + act.teacher),
            "student forward/backward": student_phase,
        }
        if targets:  # between the student's forward and its backward: its saved activations are alive
            phases["target forward"] = student_phase + b * act.target
        if disc is not None:
            phases["discriminator update"] = (g_s + (g_d if accum > 1 else 0) + disc.mp_copies + disc.working
                                              + b * (feats + 2 * act.disc))
        phases["optimizer step"] = g_s + g_d + max(h.step_temp + h.step_extra for h in (student, disc) if h)
        if targets or average:  # every rank reads the full student (the trainer's keeps_ema)
            phases["weight-average update"] = gather
        ranks.append(RankPlan(ranks=members, teachers={m: [slots[i] for i in layout.teachers_for_rank(m)]
                                                       for m in members},
                              resident=resident, phases=phases, host=student.host + (disc.host if disc else 0)))
    return Plan(recipe=recipe, gpus=gpus, budget=budget, models=models, act=act, ranks=ranks,
                layout=_layout_text(layout, slots, n_teachers), notes=notes, device=device)


def _layout_text(layout: TeacherLayout, slots: list[str], n_teachers: int) -> str:
    """The layout's description, its slots called supervisors when the objective adds its own."""
    text = layout.describe()
    if len(slots) == n_teachers:
        return text
    own = ", ".join(slots[n_teachers:])
    return (text.replace(f"{len(slots)} teachers", f"{len(slots)} supervisors ({n_teachers} teachers, {own})", 1)
            .replace("uses teacher", "uses supervisor"))


def _fused_adamw(recipe: Recipe, device: str) -> bool:
    """perf.fused_adamw (where the recipe has it): auto means fused on CUDA."""
    value = getattr(getattr(recipe, "perf", None), "fused_adamw", "off")
    return value == "on" or (value == "auto" and device == "cuda")


# --------------------------------------------------------------------------- switches
def _variant(recipe: Recipe, changes: dict[str, object]) -> Recipe:
    r = copy.deepcopy(recipe)
    for key, value in changes.items():
        section, name = key.split(".", 1)
        if section == "distributed" and name.startswith("options."):
            r.distributed.options = {**r.distributed.options, name.split(".", 1)[1]: value}
        else:
            setattr(getattr(r, section), name, value)
    return r


def switches(recipe: Recipe, gpus: int) -> list[dict[str, object]]:
    """Recipe changes worth trying, cheapest first (each a set of --set assignments)."""
    out: list[dict[str, object]] = []
    t, d = recipe.train, recipe.distributed
    if not t.gradient_checkpointing:
        out.append({"train.gradient_checkpointing": True})
    if recipe.model.teacher_dtype != "bfloat16":
        out.append({"model.teacher_dtype": "bfloat16"})
    if t.mixed_precision != "bf16":
        out.append({"train.mixed_precision": "bf16"})
    stage = int(d.options.get("zero_stage", 2)) if d.engine == "deepspeed" else None
    if d.engine == "deepspeed":
        for s in range(stage + 1, 4):
            out.append({"distributed.options.zero_stage": s})
        if not d.options.get("offload_optimizer"):
            out.append({"distributed.options.offload_optimizer": True})
            if stage < 3:
                out.append({"distributed.options.zero_stage": 3, "distributed.options.offload_optimizer": True})
    if d.engine != "fsdp2" and gpus > 1:
        out.append({"distributed.engine": "fsdp2", "distributed.options": {}})
    b = recipe.data.batch_size
    for k in range(2, b + 1):
        if b % k == 0:
            out.append({"data.batch_size": b // k, "distributed.grad_accum_steps": d.grad_accum_steps * k})
    return out


def _set_flags(changes: dict[str, object]) -> str:
    def show(v):
        return str(v).lower() if isinstance(v, bool) else ("{}" if v == {} else str(v))

    return " ".join(f"--set {k}={show(v)}" for k, v in changes.items())


def fitting_switches(p: Plan, limit: int = 3) -> list[tuple[str, int]]:
    """Up to `limit` single switches (then pairs with gradient checkpointing) whose plan fits."""
    found: list[tuple[str, int]] = []
    base_changes = switches(p.recipe, p.gpus)
    candidates = list(base_changes)
    if not p.recipe.train.gradient_checkpointing:
        candidates += [{"train.gradient_checkpointing": True, **c} for c in base_changes[1:]]
    for changes in candidates:
        if "distributed.options" in changes:
            changes = {k: v for k, v in changes.items() if k != "distributed.options"}
            variant = _variant(p.recipe, changes)
            variant.distributed.options = {}
        else:
            variant = _variant(p.recipe, changes)
        try:
            act = p.act if _same_activations(p.recipe, variant) else None
            q = plan(variant, p.gpus, p.budget, models=p.models, act=act, device=p.device)
        except DryRunError:
            continue
        if q.fits:
            found.append((_set_flags(changes), q.peak))
            if len(found) >= limit:
                break
    return found


def _same_activations(a: Recipe, b: Recipe) -> bool:
    keys = lambda r: (r.train.gradient_checkpointing, r.train.mixed_precision, r.model.teacher_dtype,
                      r.data.resolution, r.data.buckets)
    return keys(a) == keys(b)


# --------------------------------------------------------------------------- report
def _rank_label(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}..{ranks[-1]} ({len(ranks)})"
    return f"{len(ranks)} ranks ({', '.join(map(str, ranks[:4]))}{', ...' if len(ranks) > 4 else ''})"


def render(p: Plan) -> str:
    r = p.recipe
    parts = memory_parts(r)
    engine = r.distributed.engine
    opts = ", ".join(f"{k}={v}" for k, v in r.distributed.options.items())
    lines = [f"dry run of {r.name}: {p.gpus} GPU(s) of {fmt(p.budget)}; engine {engine}"
             + (f" ({opts})" if opts else "") + f"; mixed precision {r.train.mixed_precision}; gradient "
             f"checkpointing {'on' if r.train.gradient_checkpointing else 'off'}; micro-batch {r.data.batch_size} "
             f"x {r.distributed.grad_accum_steps} accumulation; {r.data.resolution} px"
             + (f" (buckets: activations at the largest one's area, {largest_side(r)} px square)"
                if r.data.buckets is not None else ""),
             f"models ({p.models.arch.name}): {p.models.source}",
             f"  student {p.models.student / 1e6:.1f}M parameters, teacher {p.models.teacher / 1e6:.1f}M, "
             f"discriminator {p.models.disc / 1e6:.1f}M"
             + ("" if parts["discriminator"] else " (not trained: " + (
                 "loss.lambda_adv is 0)" if r.loss.lambda_adv == 0 else f"objective {r.objective.name} has none)"))
             + "".join(f", {k} {v / 1e6:.1f}M" for k, v in p.models.frozen.items()),
             f"{'supervisor' if p.models.extra else 'teacher'} layout: {p.layout}",
             *(f"note: {n}" for n in p.notes[1:])]
    a = p.act
    ck = "with" if r.train.gradient_checkpointing else "without"
    other = "without" if r.train.gradient_checkpointing else "with"
    other_figure = "not measured" if a.student_other is None else fmt(a.student_other)
    calls = parts["teacher_calls"]
    rows = parts["student_rows"]
    lines.append(f"per sample: student {fmt(a.student)}"
                 + (f" x{rows} (rows per sample in its forward)" if rows > 1 else "")
                 + f" ({ck} gradient checkpointing; {other_figure} {other}), "
                 + (f"discriminator update {fmt(a.disc)}, generator-loss pass {fmt(a.disc_frozen)} (both {ck} it), "
                    if parts["discriminator"] else "")
                 + f"teacher forward {fmt(a.teacher)}" + (f" (x{calls} per step, one after another)" if calls > 1 else "")
                 + (f", teacher features {fmt(a.features)}" + (f" x{parts['teacher_features']}"
                                                               if parts["teacher_features"] > 1 else "")
                    if parts["teacher_features"] else "")
                 + (f", target forward {fmt(a.target)} (no grad, on top of the student's)" if a.target else "")
                 + f", VAE encode {fmt(a.vae)}")
    header = [_rank_label(rp.ranks) for rp in p.ranks]
    rows: list[tuple[str, list[str]]] = []
    labels: list[str] = []  # every rank's rows; a new one after its predecessor and other ranks' rows there
    for rp in p.ranks:
        own = [label for label, _ in rp.resident]
        for k, label in enumerate(own):
            if label not in labels:
                at = labels.index(own[k - 1]) + 1 if k else 0
                while at < len(labels) and labels[at] not in own:
                    at += 1
                labels.insert(at, label)
    for label in labels:
        rows.append((label, [fmt(dict(rp.resident).get(label, 0)) for rp in p.ranks]))
    rows.append(("= resident", [fmt(rp.resident_bytes) for rp in p.ranks]))
    phases = list(p.ranks[0].phases)
    for ph in phases:
        rows.append((f"+ {ph} (transient)", [fmt(rp.phases[ph]) for rp in p.ranks]))
    rows.append(("= peak", [f"{fmt(rp.peak)} ({rp.peak_phase})" for rp in p.ranks]))
    if any(rp.host for rp in p.ranks):
        rows.append(("host memory (offloaded optimizer)", [fmt(rp.host) for rp in p.ranks]))
    rows.append(("supervisors held per rank" if p.models.extra else "teachers held per rank",
                 [str(len(next(iter(rp.teachers.values())))) for rp in p.ranks]))
    width = max(len(label) for label, _ in rows)
    cols = [max(len(h), *(len(v[i]) for _, v in rows)) for i, h in enumerate(header)]
    lines.append("")
    lines.append(" " * width + "  " + "  ".join(h.rjust(c) for h, c in zip(header, cols)))
    for label, values in rows:
        lines.append(label.ljust(width) + "  " + "  ".join(v.rjust(c) for v, c in zip(values, cols)))
    held = [(rank, names) for rp in p.ranks for rank, names in rp.teachers.items()]
    shown = "; ".join(f"{rank}: {', '.join(names)}" for rank, names in sorted(held)[:16])
    lines.append(f"teachers by rank: {shown}" + (f"; ... ({len(held) - 16} more ranks)" if len(held) > 16 else ""))
    lines.append("")
    if p.fits:
        lines.append(f"FITS: peak {fmt(p.peak)} of {fmt(p.budget)} per GPU ({fmt(p.budget - p.peak)} to spare; "
                     "leave about 1 GiB for the CUDA context and fragmentation)")
    else:
        lines.append(f"DOES NOT FIT: peak {fmt(p.peak)} > {fmt(p.budget)} per GPU")
        found = fitting_switches(p)
        if found:
            lines.append("these switches would make it fit:")
            lines += [f"  {flags}   (peak {fmt(peak)})" for flags, peak in found]
        else:
            lines.append("no single switch (ZeRO stage, offload, checkpointing, smaller micro-batch with "
                         "accumulation) makes it fit: use more or larger GPUs")
    return "\n".join(lines)


def dry_run(recipe: Recipe, gpus: int | None = None, gpu_memory: str = "80GiB") -> Plan:
    """The plan for `recipe` (the launcher's --dry-run). Default GPU count: 1 with engine none,
    otherwise the number of supervisor slots (the paper's one teacher per rank)."""
    budget = parse_memory(gpu_memory)
    if gpus is None:
        gpus = 1 if recipe.distributed.engine == "none" else len(supervisor_slots(recipe))
    return plan(recipe, gpus, budget)


__all__ = ["MEASURED", "DryRunError", "Plan", "dry_run", "parse_memory", "plan", "render"]
