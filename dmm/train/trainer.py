"""The training loop: one student, N frozen teachers, a registered objective (dmm/objectives/).

The loop owns the engine, data, checkpoints, resume, logging and signals; what a micro-step
computes (the paper's three losses for `dmm`) is the objective's. The layout gives every rank its
teachers and every sample its style before the first step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from dmm.conditioning import FrozenPipeline
from dmm.data import DataError, ShardStream
from dmm.data.buckets import recipe_buckets
from dmm.data.latents import LatentStream, check_manifest
from dmm.data.sources import source_name, writes_files
from dmm.data.synthesize import synthesized_stream
from dmm.distributed import agree
from dmm.distributed.slurm import any_rank, max_over_ranks
from dmm.engines import Engine, make_engine
from dmm.io import make_dir
from dmm.models.ema import WeightEMA, walk
from dmm.models.speed import apply_speed_switches
from dmm.models.student import StyleUNet2DConditionModel
from dmm.objectives import make_objective, objective_class, student_style_names
from dmm.recipes import Recipe
from dmm.registry import get_registry
from dmm.teachers import check_teacher_paths, load_teacher, load_teacher_unet
from dmm.train.checkpoint import CheckpointManager, RunLock, choose_resume, set_rng_state
from dmm.train.layout import TeacherLayout
from dmm.train.schedule import lr_factor
from dmm.train.tblog import TrainingBoard, log_sample_grids

log = logging.getLogger("dmm.train")


class TrainingDiverged(RuntimeError):
    pass


class StopRequested(Exception):
    """Raised out of `fit` after a checkpoint was written because a stop (preemption) was asked for."""


def training_shards(recipe: Recipe, cache_root: Path) -> list[str]:
    """The shard list of the recipe's data source (a registered one: shards, toyworld, ...)."""
    return get_registry("data source").get(source_name(recipe.data)).obj(recipe.data, cache_root)


class DistillationTrainer:
    """The training loop's state: models, optimizers, data and engine, each made by a named builder."""

    def __init__(self, recipe: Recipe, engine: Engine | None = None, stop_flag=None):
        self.recipe = recipe
        self.engine = engine or make_engine(recipe.distributed.engine, recipe)
        self.stop_flag = stop_flag  # callable -> bool, checked at step boundaries (preemption)
        self.out = Path(recipe.train.output_dir)
        self.objective_class, self.objective_options = objective_class(recipe)
        self.objective_class.check(recipe, self.objective_options)  # e.g. model.init_from, before any model loads
        if recipe.model.init_unet and not Path(recipe.model.init_unet).exists():
            raise FileNotFoundError(f"model.init_unet not found: {recipe.model.init_unet} (a UNet folder or "
                                    "weights file, e.g. made by `python -m dmm.merge`)")
        self.slot_names = self.objective_class.slot_names(recipe.style_names, recipe.model.init_from,
                                                          self.objective_options)
        self.student_styles = student_style_names(recipe)
        self.num_styles = len(self.student_styles)
        self._build_layout()  # refuses impossible layouts and missing files before loading any model
        self.device = self.engine.device
        torch.manual_seed(recipe.train.seed)
        self.sync_every_step = resolve_host_sync(recipe.perf.host_sync, self.device)
        self._finite = None  # "log" host sync: a device flag, checked at log and checkpoint steps
        self.base = self._build_base()
        student = self._build_student()  # the order of builders is the order random numbers are drawn
        self.teachers = self._build_teachers()
        self.objective = make_objective(recipe.objective.name, self, recipe.objective.options)
        models = self._build_trained_models(student)
        optimizers = {k: self._optimizer(k, m) for k, m in models.items()}
        self.models = self.engine.prepare(models, optimizers, self._schedulers(optimizers))
        self.emas = self._build_emas()
        self.stream = self._build_data()
        self.generator = torch.Generator().manual_seed(recipe.train.seed * 1000 + self.engine.rank)
        self.noise_generator = self._build_noise_generator()
        self.checkpoints = CheckpointManager(self.out / "checkpoints", recipe.train.keep_last)
        self.step = 0
        self.writer = None

    # ----------------------------------------------------------------- builders
    def _build_layout(self) -> None:
        r = self.recipe
        self.accum_steps = r.distributed.grad_accum_steps
        self.layout = TeacherLayout(self.engine.world_size, len(self.slot_names), self.accum_steps)
        self.local_teachers = self.layout.teachers_for_rank(self.engine.rank)
        # One style vector per gradient-accumulation micro-step (teachers rotate through them; layout.py).
        styles = [self.layout.styles_for_batch(self.engine.rank, r.data.batch_size, m) for m in range(self.accum_steps)]
        self.micro_styles = [torch.tensor(s, device=self.engine.device) for s in styles]
        self.batch_styles = self.micro_styles[0]
        # Which samples each local teacher supervises, per micro-step: known in advance, so the step
        # never asks the device which samples belong to a teacher.
        self.micro_groups = [{i: [j for j, s in enumerate(row) if s == i] for i in self.local_teachers}
                             for row in styles]
        # Collective: a teacher missing on one rank (node) stops every rank with the same message.
        agree(check_teacher_paths, [r.teachers[i] for i in self.local_teachers if i < len(r.teachers)],
              what="teacher check",
              collective=self.engine.world_size > 1)

    def _build_base(self) -> FrozenPipeline:
        r = self.recipe
        # Precomputed inputs (data.precomputed): a folder made for another recipe is refused before
        # any model loads, and the base loads without its VAE and text encoders.
        self.precomputed = check_manifest(r.data.precomputed, r) if r.data.precomputed else None
        base = FrozenPipeline(r.model.base, resolution=r.data.resolution,
                              encoders=self.precomputed is None).to(self.device)
        if r.model.arch != "auto" and r.model.arch != base.arch.name:
            raise ValueError(f"model.arch is {r.model.arch!r} but the base at {r.model.base} is {base.arch.name}")
        return base

    def _build_teachers(self) -> dict:
        r = self.recipe
        teachers = agree(lambda: {
            i: load_teacher(i, r.teachers[i], base=r.model.base, student_base=self.base.unet,
                            dtype=r.model.teacher_dtype, default_prediction_type=self.base.prediction_type)
            for i in self.local_teachers if i < len(r.teachers)  # other slots are the objective's
        }, what="teacher loading", collective=self.engine.world_size > 1)
        for teacher in teachers.values():
            teacher.unet.to(self.device)
        self.precomputed_teachers = []  # teachers whose own conditioning comes in the batch
        if self.precomputed is not None:
            own = [i for i, t in teachers.items() if t.text_encoder is not None or t.text_encoder_2 is not None]
            agree(check_manifest, r.data.precomputed, r, own, self.local_teachers, what="precomputed inputs",
                  collective=self.engine.world_size > 1)
            for teacher in teachers.values():
                teacher.text_encoder = teacher.text_encoder_2 = None
            self.precomputed_teachers, self.teacher_captions = own, {}
            return teachers
        # A teacher with its own text encoder(s) is conditioned through them (`text_encoder: auto|own`).
        self.teacher_captions = {
            i: self.base.captions.with_encoders(t.text_encoder, t.text_encoder_2)
            for i, t in teachers.items()
            if getattr(t, "text_encoder", None) is not None or getattr(t, "text_encoder_2", None) is not None
        }
        return teachers

    def _build_student(self) -> StyleUNet2DConditionModel:
        """The base UNet (or `model.init_unet`'s weights) with a new style codebook, or the merged model
        of `model.init_from`."""
        if self.recipe.model.init_from:
            student = StyleUNet2DConditionModel.from_merged(
                Path(self.recipe.model.init_from) / "unet", self.objective_class.student_config(self.objective_options))
            student.add_styles(self.student_styles[len(student.style_names):])  # incremental: new rows
        else:
            unet = self.base.unet
            if self.recipe.model.init_unet or self.recipe.model.init_average:
                # Loaded as a teacher is: any registered format, refused unless it fits the base.
                unet = load_teacher_unet(self._init_unet_path(), base=self.recipe.model.base,
                                         dtype=unet.dtype, where="model.init_unet")
            student = StyleUNet2DConditionModel.from_unet(unet, self.student_styles)
        if self.recipe.train.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return student

    def _init_unet_path(self) -> str:
        """`model.init_unet`, or the teachers' average: merged once by the main rank (kept for resumes)."""
        r = self.recipe
        if not r.model.init_average:
            return r.model.init_unet
        path = self.out / "init_unet.safetensors"

        def average() -> None:
            if self.engine.is_main and not path.exists():
                from dmm.merge import merge_models  # sd-mecha: imported only when used

                log.info("averaging the %d teachers' weights into %s (model.init_average)", len(r.teachers), path)
                make_dir(self.out)
                merge_models("weighted_sum", [t.path for t in r.teachers], path)

        # Collective: every rank waits for the file, and a failed merge stops all of them with its message.
        agree(average, what="model.init_average", collective=self.engine.world_size > 1)
        return str(path)

    def _build_trained_models(self, student) -> dict[str, torch.nn.Module]:
        """The objective's trained models (the student; the discriminator with the adversarial loss),
        trainable, on the device."""
        models = self.objective.trained_models(student)
        for model in [*models.values(), *(t.unet for t in self.teachers.values())]:
            apply_speed_switches(model, self.recipe.perf)
        self.base.pipe.unet = None  # the student now holds the base weights; free the copy
        for model in models.values():
            # The discriminator's encoder is copied from the frozen base UNet: make every trained
            # parameter trainable before an engine registers its gradient hooks (ZeRO skips the rest).
            model.requires_grad_(True)
            model.to(self.device)
            if self.recipe.train.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
                model.enable_gradient_checkpointing()  # the discriminator's too (the student's is on already)
        return models

    def _build_emas(self) -> dict[str, WeightEMA]:
        """Weight averages of the student: `optim.ema_decay`'s (main rank, for export) and the
        objective's own (every rank, e.g. a target network), each starting at the student's weights."""
        emas = dict(self.objective.emas())
        if self.recipe.optim.ema_decay > 0 and self.engine.is_main:
            emas["student"] = WeightEMA("student", self.recipe.optim.ema_decay)
        # The same on every rank: whether this step reads the full parameters (a collective when sharded).
        self.keeps_ema = self.recipe.optim.ema_decay > 0 or bool(emas)
        if self.keeps_ema:  # every rank walks the parameters (a gather when sharded), one at a time
            for ema in emas.values():
                ema.begin()
            with self.engine.full_params("student") as params:
                walk(emas.values(), params, WeightEMA.start_one)
        return emas

    def _update_emas(self) -> None:
        """Every rank walks the parameters (a sharded engine gathers them one at a time, so the
        transient is one parameter, not the model); the ranks holding an average update it."""
        if self.keeps_ema:
            with self.engine.full_params("student") as params:
                walk(self.emas.values(), params, WeightEMA.update_one)

    def _optimizer(self, which: str, model: torch.nn.Module) -> torch.optim.Optimizer:
        o = self.recipe.optim
        lr = o.lr if which == "student" else o.disc_lr
        if which == "student":
            style = [p for n, p in model.named_parameters() if n.startswith("class_embedding.")]
            rest = [p for n, p in model.named_parameters() if not n.startswith("class_embedding.")]
            groups = [{"params": rest, "lr": lr}, {"params": style, "lr": lr * o.style_lr_multiplier}]
        else:
            groups = [{"params": list(model.parameters()), "lr": lr}]
        fused = {"on": True, "off": None, "auto": True if self.device.type == "cuda" else None}[self.recipe.perf.fused_adamw]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused)

    def _build_noise_generator(self) -> torch.Generator:
        """Noise and timesteps: the CPU generator (copied to the device), or one living on the device."""
        on = {"on": True, "off": False, "auto": self.device.type == "cuda"}[self.recipe.perf.device_rng]
        if not on or self.device.type == "cpu":
            return self.generator
        return torch.Generator(self.device).manual_seed(self.recipe.train.seed * 1000 + self.engine.rank + 7919)

    def randn(self, shape) -> torch.Tensor:
        """Gaussian noise on the training device from the noise generator (saved in checkpoints)."""
        g = self.noise_generator
        if g.device.type == "cpu":
            return torch.randn(shape, generator=g).to(self.device)
        return torch.randn(shape, generator=g, device=self.device)

    def randint(self, high: int, n: int) -> torch.Tensor:
        g = self.noise_generator
        if g.device.type == "cpu":
            return torch.randint(0, high, (n,), generator=g).to(self.device)
        return torch.randint(0, high, (n,), generator=g, device=self.device)

    def _schedulers(self, optimizers: dict) -> dict:
        o, total = self.recipe.optim, self.recipe.train.max_steps
        factor = functools.partial(lr_factor, schedule=o.lr_schedule, warmup=o.warmup_steps, total=total,
                                   floor=o.min_lr_ratio)
        return {k: torch.optim.lr_scheduler.LambdaLR(opt, factor) for k, opt in optimizers.items()}

    def _build_data(self) -> ShardStream:
        """The main rank lets a file-writing source (the toy world) write its shards first."""
        r = self.recipe
        if self.precomputed is not None:  # output shard k mirrors source shard k: the same sample order
            urls = [str(Path(r.data.precomputed) / s["name"]) for s in self.precomputed["shards"]]
            return LatentStream(urls, batch_size=r.data.batch_size, resolution=r.data.resolution, seed=r.train.seed,
                                rank=self.engine.rank, world_size=self.engine.world_size,
                                shuffle_buffer=r.data.shuffle_buffer, num_workers=r.data.num_workers)
        if source_name(r.data) == "synthesized":  # slot i reads teacher i's own images, made first if missing
            return synthesized_stream(r, self.engine, self.base.pipe, self.teachers, self.layout, self.micro_groups)
        cache_root = self.out.parent / ".shards"
        wait = writes_files(source_name(r.data)) and self.engine.world_size > 1
        if wait and not self.engine.is_main:
            self.engine.barrier()
        urls = training_shards(r, cache_root)
        if wait and self.engine.is_main:
            self.engine.barrier()
        return ShardStream(urls, batch_size=r.data.batch_size, resolution=r.data.resolution, seed=r.train.seed,
                           rank=self.engine.rank, world_size=self.engine.world_size, image_key=r.data.image_key,
                           caption_key=r.data.caption_key, shuffle_buffer=r.data.shuffle_buffer,
                           num_workers=r.data.num_workers, buckets=recipe_buckets(r), bucket_crop=r.data.bucket_crop)

    def autocast(self):
        if self.recipe.train.mixed_precision == "bf16":
            return torch.autocast(self.engine.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------- one step
    def train_step(self, batch: dict | list[dict]) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches (a list; one dict when it is 1)."""
        r = self.recipe
        batches = batch if isinstance(batch, list) else [batch]
        if len(batches) != self.accum_steps:
            raise ValueError(f"train_step got {len(batches)} micro-batches, grad_accum_steps is {self.accum_steps}")
        totals: dict[str, float | torch.Tensor] = {}
        for m, micro in enumerate(batches):
            losses = self.micro_step(micro, self.micro_styles[m], 1.0 / len(batches), self.micro_groups[m])
            for k, v in losses.items():
                # "step" host sync: a float now; "log": a device tensor until `as_floats` at a log step
                v = float(v.detach()) if self.sync_every_step else v.detach()
                totals[k] = totals.get(k, 0.0) + v / len(batches)
        stats = {"grad_norm": self.engine.step("student", r.optim.grad_clip)}
        self._update_emas()
        if "disc" in self.models:
            stats["disc_grad_norm"] = self.engine.step("disc", r.optim.grad_clip)
        metrics = {**totals, **stats}
        return as_floats(metrics) if self.sync_every_step else metrics

    def micro_step(self, batch: dict, styles: torch.Tensor, scale: float = 1.0,
                   groups: dict[int, list[int]] | None = None) -> dict[str, torch.Tensor]:
        """The objective's forward and backward of one micro-batch (the optimizers step in `train_step`)."""
        if groups is None:  # called directly (tests): group by the given styles
            groups = {i: [j for j, s in enumerate(styles.tolist()) if s == i] for i in self.teachers}
        return self.objective.micro_step(batch, styles, scale, groups)

    def check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        """Refuse NaN/inf losses before anything is updated ("step" host sync); under "log" host sync
        fold them into a device flag that `verify_finite` reads at log and checkpoint steps."""
        if not self.sync_every_step:
            flag = torch.stack([torch.isfinite(v).all() for v in losses.values()]).all()
            self._finite = flag if self._finite is None else self._finite & flag
            self._finite_names = sorted(set(getattr(self, "_finite_names", ())) | set(losses))
            return
        bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
        if bad:
            last = self.checkpoints.latest()
            raise TrainingDiverged(
                f"loss {', '.join(bad)} became NaN/inf at step {self.step + 1}; nothing was updated. "
                f"Last good checkpoint: {last if last else 'none written yet'}. "
                "Lower optim.lr, keep optim.grad_clip, or check the data."
            )

    # ----------------------------------------------------------------- state
    def _trainer_state(self) -> dict:
        return {"recipe": self.recipe.to_dict()}

    def save_checkpoint(self) -> Path:
        folder = self.checkpoints.save(self.engine, self.step, self._trainer_state(),
                                       {"data": self.stream.state_dict(), "generator": self.generator.get_state(),
                                        "noise_generator": self.noise_generator.get_state(),
                                        "objective": self.objective.state_dict()},
                                       main_files=self._save_emas)
        self.saved = (self.step, folder)
        return folder

    def _save_emas(self, folder: Path) -> None:
        """Main rank: every average (an objective's is the same on every rank)."""
        for ema in self.emas.values():
            ema.save(folder)

    def maybe_resume(self) -> Path | None:
        """Decide from `train.resume` and the run folder (`checkpoint.choose_resume`, on the main rank,
        the same outcome or error on every rank) and load the chosen checkpoint. It writes nothing
        but the moving aside of an earlier run on a fresh start, so a refused resume leaves the folder as it was."""
        def decide():
            if not self.engine.is_main:
                return None
            if getattr(self, "run_lock", None) is not None:  # one run per folder (set by fit)
                self.run_lock.acquire()
            return choose_resume(self.out, self.checkpoints, self.recipe.train.resume, self.recipe.to_dict(),
                                 self.engine.world_size)

        folder, message = self.engine.broadcast_object(agree(decide, what="resume",
                                                             collective=self.engine.world_size > 1))
        if folder is not None:
            state, rank_state = self.checkpoints.load_state(folder, self.engine.rank)
            self.engine.load(folder)
            for ema in self.emas.values():
                ema.load(folder)
            self.stream.load_state_dict(rank_state["data"])
            self.generator.set_state(rank_state["generator"])
            if "noise_generator" in rank_state and self.noise_generator is not self.generator:
                self.noise_generator.set_state(rank_state["noise_generator"])
            self.objective.load_state_dict(rank_state.get("objective", {}))
            set_rng_state(rank_state["rng"])
            self.step = state["step"]
            self.saved = (self.step, folder)
        if self.engine.is_main:
            log.info("%s", message)
        return folder

    # ----------------------------------------------------------------- loop
    def fit(self) -> Path:
        """Train to `train.max_steps`, continuing the run folder's run as `train.resume` says. A stop
        request (`stop_flag()` returns a signal number, or True; agreed by the ranks at each step
        boundary) writes a checkpoint and raises StopRequested with `.signum`, `.step`, `.checkpoint`."""
        r = self.recipe
        self.saved = (None, None)
        self.run_lock = RunLock(self.out)  # the main rank holds it from the resume check to the end
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(self.run_lock.release)
            self.maybe_resume()  # refuses an incompatible run before anything is written
            board = None  # TensorBoard (dmm/train/tblog.py), on the main rank
            if self.engine.is_main:
                make_dir(self.out)
                r.save(self.out / "recipe.yaml")
                board = TrainingBoard(self.out / "tb", r, self.micro_styles, self.step, names=self.slot_names)
                self.writer = board.writer
                cleanup.callback(board.close)
            bar = tqdm(total=r.train.max_steps, initial=self.step, desc="distill", disable=not self.engine.is_main,
                       dynamic_ncols=True)
            cleanup.callback(bar.close)
            data = iter(self.stream)
            started, start_step = time.time(), self.step
            while self.step < r.train.max_steps:
                signum = 0 if self.stop_flag is None else max_over_ranks(int(self.stop_flag() or 0),
                                                                         self.engine.world_size)
                if signum:
                    folder = self.saved[1] if self.saved[0] == self.step else self.save_checkpoint()
                    stop = StopRequested(f"stopped at step {self.step} on request; checkpoint saved: {folder}")
                    stop.signum, stop.step, stop.checkpoint = signum, self.step, folder
                    raise stop
                metrics = self.train_step(self._next_batches(data))
                self.step += 1
                bar.update(1)
                log_now = self.step % r.train.log_every == 0 or self.step == r.train.max_steps
                if not self.sync_every_step and (log_now or self.step % r.train.checkpoint_every == 0):
                    self.verify_finite()
                    metrics = as_floats(metrics)
                if self.engine.is_main and log_now:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("score", "feat", "gen", "disc")})
                    board.log_step(metrics, self.step, getattr(self.engine, "schedulers", None))
                    elapsed = time.time() - started
                    samples = r.data.batch_size * self.accum_steps * self.engine.world_size * (self.step - start_step)
                    self.writer.add_scalar("perf/samples_per_s", samples / max(elapsed, 1e-9), self.step)
                if self.step % r.train.checkpoint_every == 0 or self.step == r.train.max_steps:
                    self.save_checkpoint()
                    log_sample_grids(board, self.engine, self.models["student"], r, self._grid_pipe(), self.stream,
                                     self.step)
        return self.saved[1] or self.checkpoints.latest()

    def verify_finite(self) -> None:
        """The "log" host sync's NaN check: one device-to-host read since the last check."""
        if self._finite is not None and not bool(self._finite):
            last = self.checkpoints.latest()
            raise TrainingDiverged(
                f"a loss ({', '.join(self._finite_names)}) became NaN/inf at or before step {self.step} (perf.host_sync: "
                f"log checks at log and checkpoint steps; `step` stops before the update). Last good checkpoint: "
                f"{last if last else 'none written yet'}. Lower optim.lr, keep optim.grad_clip, or check the data."
            )
        self._finite = None

    def _grid_pipe(self):
        """The pipeline the sample grids run (main rank). Training from precomputed inputs loaded no VAE
        or text encoders: the grids' copy of them loads at the first grid, on the main rank only."""
        if self.precomputed is None or not (self.engine.is_main and self.recipe.log.samples):
            return self.base.pipe
        if getattr(self, "_sampling_pipe", None) is None:
            self._sampling_pipe = DiffusionPipeline.from_pretrained(str(self.base.path), unet=None,
                                                                    local_files_only=True).to(self.device)
        return self._sampling_pipe

    def _next_batches(self, data) -> list[dict]:
        """This step's micro-batches. A bad shard met on one rank (a DataError, named by shard and
        sample) stops every rank with the same message instead of leaving the others waiting in the
        next collective: with several ranks they agree on it (one all-reduce of a flag per step)."""
        failure = None
        try:
            batches = [next(data) for _ in range(self.accum_steps)]
        except DataError as err:
            failure = err
        if self.engine.world_size > 1 and any_rank(failure is not None):
            def reraise():
                if failure is not None:
                    raise failure

            agree(reraise, what=f"reading data for step {self.step + 1}")
        if failure is not None:
            raise failure
        return batches

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.full_state_dict("student")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """What the merged model gets (collective): the weight average when `optim.ema_decay` keeps
        one, else the trained weights; complete on the main rank."""
        state = self.student_state_dict()
        if "student" in self.emas:
            state.update(self.emas["student"].state_dict())
        return state


def resolve_host_sync(choice: str, device: torch.device) -> bool:
    """True: losses are read on the host every micro-step ("step"); False: only at log steps."""
    return choice == "step" or (choice == "auto" and device.type != "cuda")


def as_floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def set_threads() -> None:
    """Distributed launchers set OMP_NUM_THREADS; a lone process uses every core."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


__all__ = ["DistillationTrainer", "StopRequested", "TrainingDiverged"]
