"""The `splam` objective: distil the merged model into a few-step one, every style prompt kept.

SPLAM (same authors, ECCV 2024) is latent-consistency distillation along sub-paths. For each
sample: a DDIM step pair t_{n+k} -> t_n on the teacher's 50-step grid; the sample's teacher takes
that step with fixed classifier-free guidance (eps = cond + w (cond - uncond)) from the noised
latent z; the student sees a point on the sub-path between z and the teacher's x_prev,

    input = gamma z + (1 - gamma) x_prev a_{n+k} / a_n,    gamma ~ U(0, 1),

told where it is by gamma through the UNet's own `timestep_cond` input, and predicts the clean
latent with the consistency boundary scalings at t_{n+k}. The target is an EMA copy of the
student (decay 0.95) at (x_prev, t_n) with the gamma = 1 embedding; the loss is pseudo-Huber.

gamma enters `timestep_cond` as diffusers' guidance-scale embedding of (1 - gamma): a stock
pipeline passes the embedding of (guidance_scale - 1), so sampling with the LCM scheduler at
guidance 1 asks for gamma = 1, the plain consistency-model input the target was trained with.
The new `time_embedding.cond_proj` layer starts at zero, so the student starts as the merged model.
On a v-prediction base (the toy world's) the teacher step and the target decode x0 the usual way
(a x - s v) and the student's sub-path point is read after rescaling it to unit variance
(`decode_x0`): dividing by a_s, as the epsilon form does, blows up where a cosine schedule's
signal is ~0 (the toy's alphas_cumprod at t = 999 is 2e-9).
The teachers are the recipe's (one per style, the same as the merged model's), laid out as in `dmm`;
the recipe's `loss` section (the dmm weights) does not apply, and there is no discriminator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from dmm.diffusion import add_noise, predict_eps, predict_x0
from dmm.losses.consistency import pseudo_huber_loss
from dmm.models.ema import WeightEMA
from dmm.models.student import StyleUNet2DConditionModel
from dmm.objectives import OBJECTIVES, check_init_from
from dmm.objectives.dmm import DMMObjective
from dmm.schema import setting


@dataclass(frozen=True)
class SplamOptions:
    ddim_steps: int = setting(50, help="the teacher solver's grid: k = num_train_timesteps / ddim_steps", ge=2)
    guidance: float = setting(8.0, help="teacher CFG as eps = cond + w (cond - uncond) (an effective scale of "
                                        "w + 1)", ge=0.0)
    ema_decay: float = setting(0.95, help="decay of the target network (an EMA of the student)", gt=0.0, lt=1.0)
    loss: Literal["huber", "l2"] = setting("huber", help="pseudo-Huber sqrt(d^2 + c^2) - c, or mean squared error")
    huber_c: float = setting(1e-3, help="the pseudo-Huber constant c", gt=0.0)
    cond_dim: int = setting(256, help="width of the gamma embedding (the UNet's time_cond_proj_dim)", ge=2)
    steps: int = setting(4, help="inference steps the exported model is set up for (LCM scheduler, guidance 1)",
                         ge=1)


def gamma_embedding(gamma: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' guidance-scale embedding of (1 - gamma): what a stock pipeline passes at guidance 1 - gamma + 1."""
    return StableDiffusionPipeline.get_guidance_scale_embedding(None, 1.0 - gamma.float().cpu(), embedding_dim=dim)


def sub_path(z, x_prev, gamma, a_s, a_e):
    """The student's input between z (at t_{n+k}, signal a_s) and x_prev (at t_n, signal a_e), rescaled to
    z's signal level, and the noise level sigma it decodes x0 with: sigma = the noise std at t_{n+k}
    for gamma = 1, x_prev's own (s_e a_s / a_e) for gamma = 0."""
    g = gamma.view(-1, 1, 1, 1)
    ratio = a_s / a_e
    s_e = (1 - a_e ** 2).clamp(min=0).sqrt()
    point = g * z + (1 - g) * x_prev * ratio
    sigma = ((s_e * ratio) ** 2 + g ** 2 * (1 - ratio ** 2)).clamp(min=0).sqrt()
    return point, sigma


def decode_x0(output: torch.Tensor, point: torch.Tensor, sigma: torch.Tensor, a_s: torch.Tensor,
              prediction_type: str) -> torch.Tensor:
    """The clean latent a student output implies at a sub-path point (signal a_s, noise sigma).
    epsilon: (point - sigma eps) / a_s, as SPLAM. v_prediction: v read on the point rescaled to unit
    variance, x0 = a_s point / tau^2 - (sigma / tau) v with tau^2 = a_s^2 + sigma^2; that is the usual
    a x - s v at gamma = 1, and stays finite where a_s is ~0 (a cosine schedule's last steps), where
    dividing by a_s does not."""
    if prediction_type == "epsilon":
        return (point - sigma * output) / a_s
    if prediction_type == "v_prediction":
        tau2 = a_s ** 2 + sigma ** 2
        return a_s * point / tau2 - sigma / tau2.sqrt() * output
    raise NotImplementedError(f"objective splam: no sub-path decoding for {prediction_type!r} outputs")


@OBJECTIVES.register("splam", options=SplamOptions,
                     description="few-step distillation of model.init_from (SPLAM: sub-path consistency, EMA target, "
                                 "pseudo-Huber loss, DDIM teacher solver with fixed guidance); samples in 2-4 steps")
class SplamObjective(DMMObjective):
    @classmethod
    def student_config(cls, options: SplamOptions) -> dict:
        return {"time_cond_proj_dim": options.cond_dim}

    @classmethod
    def export_sampling(cls, options: SplamOptions) -> dict:
        return {"scheduler": "lcm", "num_inference_steps": options.steps, "guidance_scale": 1.0}

    @classmethod
    def memory_parts(cls, recipe, options) -> dict:
        """No discriminator (loss.lambda_adv does not apply), no teacher features, each teacher called
        twice (cond, uncond), and the target network: a whole fp32 student on every rank (emas())."""
        return {"discriminator": False, "teacher_features": 0, "teacher_calls": 2,
                "target_networks": ("splam_target",)}

    @classmethod
    def check(cls, recipe, options):
        if not recipe.model.init_from:
            raise ValueError("objective splam distils a merged model into a few-step one: set model.init_from to "
                             "the merged model's folder")
        if recipe.loss.uncond_weight > 0:
            raise ValueError("loss.uncond_weight belongs to the dmm and incremental objectives; splam's target "
                             "already takes both branches (its fixed CFG): set it to 0")
        check_init_from(recipe.model.init_from, recipe.model.base, recipe.style_names)
        config = UNet2DConditionModel.load_config(str(Path(recipe.model.init_from) / "unet"))
        have = config.get("time_cond_proj_dim")
        if have is not None and have != options.cond_dim:
            raise ValueError(f"model.init_from's UNet already takes a timestep_cond of width {have}, the recipe asks "
                             f"for {options.cond_dim}: set objective.options.cond_dim to {have}")
        base = UNet2DConditionModel.load_config(str(Path(recipe.model.base) / "unet"))
        if config.get("class_embed_type") is not None or base.get("time_embedding_type", "positional") != "positional":
            raise ValueError("objective splam needs a UNet whose time embedding takes timestep_cond (a positional "
                             "time embedding, no class embedding of its own)")
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.load_config(str(Path(recipe.model.base) / "scheduler"))
        if scheduler.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
            raise NotImplementedError(f"objective splam: the base predicts {scheduler['prediction_type']}; the "
                                      "sub-path decoding is defined for epsilon and v_prediction bases")

    def __init__(self, trainer, options):
        super().__init__(trainer, options)
        num = trainer.base.num_train_timesteps
        self.k = num // options.ddim_steps
        device = trainer.device
        # t_{n+k}: 19, 39, ..., 999 for 50 of 1000; on the device, so a step indexes it without a host sync
        self.grid = (torch.arange(1, options.ddim_steps + 1) * self.k - 1).to(device)
        # The LCM scheduler's boundary scalings (what sampling uses) for every timestep, computed once.
        lcm = LCMScheduler.from_config(trainer.base.pipe.scheduler.config)
        table = torch.tensor([lcm.get_scalings_for_boundary_condition_discrete(t) for t in range(num)],
                             dtype=torch.float32)
        self.c_skip, self.c_out = table[:, 0].to(device), table[:, 1].to(device)
        self._target = None

    def emas(self):
        """The target network: a whole fp32 copy of the student on every rank, the student's EMA."""
        tr = self.trainer
        student = tr.models["student"]
        config = {k: v for k, v in getattr(student, "module", student).config.items() if not k.startswith("_")}
        target = StyleUNet2DConditionModel(**config).to(tr.device).requires_grad_(False).eval()
        self._target = target
        return {"splam_target": WeightEMA("splam_target", self.options.ema_decay, dict(target.named_parameters()))}

    def trained_models(self, student):
        return {"student": student}

    def _scalings(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.c_skip[t].view(-1, 1, 1, 1), self.c_out[t].view(-1, 1, 1, 1)

    def micro_step(self, batch, styles, scale, groups):
        tr, o = self.trainer, self.options
        labels = self.class_labels(styles)
        latents = self.latents(batch)
        inputs = self.conditioned(batch, latents, list(batch["captions"]))  # no caption drop: guidance is baked in
        empty = self.conditioned(batch, latents, [""] * latents.shape[0])
        cond = inputs.cond
        n = latents.shape[0]
        start = self.grid[tr.randint(len(self.grid), n)]  # t_{n+k}
        end = (start - self.k).clamp(min=0)  # t_n
        noise = tr.randn(latents.shape)
        z = add_noise(latents, noise, start, tr.base.alphas_cumprod)
        gamma = torch.rand(n, generator=tr.generator).to(tr.device)
        abar = tr.base.alphas_cumprod.to(tr.device, torch.float32)
        a_s, a_e = abar[start].sqrt().view(-1, 1, 1, 1), abar[end].sqrt().view(-1, 1, 1, 1)
        s_e = (1 - abar[end]).sqrt().view(-1, 1, 1, 1)

        ptype, ab = tr.base.prediction_type, tr.base.alphas_cumprod
        with torch.no_grad():  # the teacher's DDIM step z (t_{n+k}) -> x_prev (t_n), with fixed guidance
            out_c = self.teacher_outputs(z, start, inputs, groups, False, labels)[0]
            out_u = self.teacher_outputs(z, start, empty, groups, False, labels)[0]
            guided = out_c + o.guidance * (out_c - out_u)  # linear in the output: the same in eps or v terms
            x_prev = a_e * predict_x0(guided, z, start, ab, ptype) + s_e * predict_eps(guided, z, start, ab, ptype)

        student_in, sigma = sub_path(z, x_prev, gamma, a_s, a_e)
        emb = gamma_embedding(gamma, o.cond_dim).to(tr.device)
        student = tr.models["student"]
        with tr.autocast():
            out_s = student(student_in, start, cond.encoder_hidden_states, class_labels=labels,
                            timestep_cond=emb, **cond.unet_kwargs()).sample.float()
        c_skip, c_out = self._scalings(start)
        pred = c_skip * student_in + c_out * decode_x0(out_s, student_in, sigma, a_s, ptype)

        with torch.no_grad(), tr.autocast():
            one = gamma_embedding(torch.ones(n), o.cond_dim).to(tr.device)
            out_t = self._target(x_prev, end, cond.encoder_hidden_states, class_labels=labels,
                                 timestep_cond=one, **cond.unet_kwargs()).sample.float()
        c_skip_e, c_out_e = self._scalings(end)
        target = c_skip_e * x_prev + c_out_e * predict_x0(out_t, x_prev, end, ab, ptype)

        if o.loss == "huber":
            loss = pseudo_huber_loss(pred, target, o.huber_c)
        else:
            loss = torch.nn.functional.mse_loss(pred, target)
        losses = {"consistency": loss, "total": loss}
        tr.check_finite(losses)
        tr.engine.backward("student", loss * scale if scale != 1.0 else loss)
        return losses


__all__ = ["SplamObjective", "SplamOptions", "decode_x0", "gamma_embedding", "sub_path"]
