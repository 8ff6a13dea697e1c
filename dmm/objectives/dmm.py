"""The `dmm` objective: the paper's Algorithm 1, one micro-batch at a time.

For this rank's samples: noisy latents of real images, one teacher style per sample, student and
teacher predictions (with block features), then
  L_student = L_score + lambda_feat * L_feat + lambda_adv * L_gen     (student update)
  L_disc    = CE(D(x0_student), N + i) + CE(D(x0_teacher), i)        (discriminator update)
The steps are methods so that a stage that differs in one of them (another target, another input)
overrides only that one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from dmm.conditioning import Conditioning, drop_captions
from dmm.data.latents import BASE, teacher_prefix
from dmm.diffusion import add_noise, convert_prediction, predict_x0
from dmm.losses import discriminator_loss, feature_imitation_loss, generator_loss, score_distillation_loss
from dmm.losses.score import score_parts
from dmm.models.discriminator import MultiClassDiscriminator
from dmm.models.features import BlockFeatures
from dmm.models.student import StyleUNet2DConditionModel
from dmm.objectives import OBJECTIVES, Objective


@dataclass
class StepInputs:
    """One micro-batch ready for the UNets: clean latents, the (dropped) captions and their conditioning."""

    latents: torch.Tensor
    captions: list[str]
    cond: Conditioning
    teacher_conds: dict[int, Conditioning] = field(default_factory=dict)  # precomputed, own-encoder teachers


def with_size_ids(cond: Conditioning, time_ids: torch.Tensor | None) -> Conditioning:
    """SDXL: each sample's size ids (original size, crop, target) from the data, not the pipeline's default."""
    if cond.added_cond_kwargs is None or time_ids is None:
        return cond
    return Conditioning(cond.encoder_hidden_states, {**cond.added_cond_kwargs, "time_ids": time_ids})


@dataclass
class Mixtures:
    """Samples trained on a mixture of two local teachers' styles (`loss.mix_share`)."""

    weights: torch.Tensor  # (B, N) the student's style weights (one-hot for unmixed samples)
    partners: dict[int, list[int]]  # partner teacher slot -> its mixed samples
    own: torch.Tensor  # (B, 1, 1, 1) weight of each sample's own teacher (1 for unmixed)
    mixed: torch.Tensor  # (B,) bool

    def blend(self, own: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        """own * w + partner * (1 - w) on mixed rows; own elsewhere (partner rows there are unset)."""
        w = self.own.view(-1, *([1] * (own.dim() - 1)))
        mask = self.mixed.view(-1, *([1] * (own.dim() - 1)))
        return torch.where(mask, w * own + (1 - w) * partner, own)


@OBJECTIVES.register("dmm", description="score distillation + feature imitation + multi-class adversarial loss "
                                        "(the paper's Algorithm 1)")
class DMMObjective(Objective):
    @property
    def use_adv(self) -> bool:
        return self.trainer.recipe.loss.lambda_adv > 0

    @classmethod
    def memory_parts(cls, recipe, options) -> dict:
        """The discriminator with the adversarial loss; with loss.mix_share the partners' block outputs
        stay alive next to the blended ones (micro_step's partner_feats); with loss.uncond_weight each
        teacher is called again on the empty caption and the student forwards both branches at once."""
        loss = recipe.loss
        features = 0 if loss.lambda_feat <= 0 else (2 if loss.mix_share > 0 else 1)
        uncond = loss.uncond_weight > 0
        return {**super().memory_parts(recipe, options), "discriminator": loss.lambda_adv > 0,
                "teacher_features": features, "teacher_calls": 1 + uncond, "student_rows": 1 + uncond}

    def trained_models(self, student):
        models = {"student": student}
        if self.use_adv:
            models["disc"] = MultiClassDiscriminator(self.trainer.base.unet, len(self.trainer.student_styles))
        return models

    # ------------------------------------------------------------- pieces
    def inputs(self, batch: dict) -> StepInputs:
        """Latents of the batch's images; captions dropped ONCE per sample, shared by student and teachers."""
        tr = self.trainer
        latents = self.latents(batch)
        captions = drop_captions(batch["captions"], tr.recipe.data.caption_dropout, tr.generator)
        return self.conditioned(batch, latents, captions)

    def latents(self, batch: dict) -> torch.Tensor:
        tr = self.trainer
        if "latents" in batch:  # precomputed inputs (data.precomputed): stored tensors
            return batch["latents"].to(tr.device)
        return tr.base.encode_images(batch["pixels"].to(tr.device))

    def conditioned(self, batch: dict, latents: torch.Tensor, captions: list[str]) -> StepInputs:
        """The batch's inputs with these captions (e.g. all "" for the unconditional branch): the
        student's conditioning, and own-encoder teachers' when they come precomputed."""
        tr = self.trainer
        if "latents" in batch:
            own = {i: tr.stream.conditioning(batch, teacher_prefix(i), captions, tr.device)
                   for i in tr.precomputed_teachers}
            return StepInputs(latents, captions, tr.stream.conditioning(batch, BASE, captions, tr.device), own)
        ids = batch["size_ids"].to(tr.device, torch.float32) if "size_ids" in batch else None
        return StepInputs(latents, captions, with_size_ids(tr.base.encode_captions(captions), ids))

    def noised(self, latents: torch.Tensor):
        """(t, x_t): random numbers from the trainer's noise generator (saved in checkpoints)."""
        tr = self.trainer
        noise = tr.randn(latents.shape)
        t = tr.randint(tr.base.num_train_timesteps, latents.shape[0])
        x_t = add_noise(latents, noise, t, tr.base.alphas_cumprod)
        if tr.recipe.perf.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return t, x_t

    def teacher_outputs(self, x_t, t, inputs: StepInputs, groups: dict[int, list[int]], want_features: bool,
                        labels: torch.Tensor | None = None):
        """Each local supervisor's prediction (and block features) on the samples of its slot, converted
        to the base's parameterisation; a teacher with its own text encoders gets their encoding of
        the same captions; a style UNet supervisor (a frozen earlier student) gets the samples' styles."""
        tr = self.trainer
        out = torch.empty_like(x_t, dtype=torch.float32)
        feats: dict[str, torch.Tensor] = {}
        for i, teacher in tr.teachers.items():
            rows = groups.get(i, [])
            if not rows:
                continue
            idx = torch.tensor(rows, device=x_t.device)
            if i in inputs.teacher_conds:
                sub = inputs.teacher_conds[i].select(idx)
            elif i in tr.teacher_captions:
                sub = tr.teacher_captions[i].encode([inputs.captions[j] for j in rows])
                if inputs.cond.added_cond_kwargs is not None:
                    sub = with_size_ids(sub, inputs.cond.added_cond_kwargs["time_ids"][idx])
            else:
                sub = inputs.cond.select(idx)
            dtype = next(teacher.unet.parameters()).dtype
            kwargs = {k: {n: v.to(dtype) for n, v in a.items()} for k, a in sub.unet_kwargs().items()}
            hooks = BlockFeatures(teacher.unet, detach=True) if want_features else contextlib.nullcontext()
            if isinstance(teacher.unet, StyleUNet2DConditionModel):
                kwargs["class_labels"] = labels[idx]
            with torch.no_grad(), hooks as recorder:
                pred = teacher.unet(x_t[idx].to(dtype), t[idx], sub.encoder_hidden_states.to(dtype), **kwargs).sample
            if teacher.prediction_type != tr.base.prediction_type:
                pred = convert_prediction(pred, x_t[idx], t[idx], tr.base.alphas_cumprod,
                                          teacher.prediction_type, tr.base.prediction_type)
            out[idx] = pred.float()
            if want_features:
                for name, f in recorder.outputs.items():
                    if name not in feats:
                        feats[name] = torch.empty((x_t.shape[0], *f.shape[1:]), dtype=torch.float32,
                                                  device=x_t.device)
                    feats[name][idx] = f.float()
        return out, feats

    def mixtures(self, labels: torch.Tensor, groups: dict[int, list[int]]) -> Mixtures | None:
        """`loss.mix_share`: which samples train on a mixture of their style and another local
        teacher's, with which partner and weight (drawn from the trainer's generator, so a resumed
        run draws the same). None when off."""
        tr = self.trainer
        share = tr.recipe.loss.mix_share
        if share <= 0:
            return None
        n = labels.shape[0]
        u, w = torch.rand(n, generator=tr.generator), torch.rand(n, generator=tr.generator)
        pick = torch.randint(0, 1 << 30, (n,), generator=tr.generator)
        slot_of = {j: i for i, rows in groups.items() for j in rows}
        local = sorted(groups)
        weights = torch.zeros(n, len(tr.student_styles))  # from the host-side groups: no device read
        for j, i in slot_of.items():
            weights[j, i] = 1.0
        own = torch.ones(n)
        partners: dict[int, list[int]] = {}
        count = 0
        for j in range(n):
            others = [i for i in local if i != slot_of.get(j)]
            last_single = j == n - 1 and count == n - 1  # one sample stays single-style (adversarial loss)
            if j not in slot_of or not others or u[j] >= share or last_single:
                continue
            count += 1
            p = others[int(pick[j]) % len(others)]
            partners.setdefault(p, []).append(j)
            own[j] = w[j]
            weights[j] = w[j] * weights[j]
            weights[j, p] += 1 - w[j]
        if not partners:
            return None
        mixed = torch.zeros(n, dtype=torch.bool)
        for rows in partners.values():
            mixed[rows] = True
        dev = labels.device
        return Mixtures(weights.to(dev), partners, own.view(-1, 1, 1, 1).to(dev), mixed.to(dev))

    def targets(self, x_t, t, inputs: StepInputs, groups: dict[int, list[int]], want_features: bool,
                labels: torch.Tensor, mix: Mixtures | None):
        """Each sample's supervision (output, block features); mixed samples get the same mixture of
        their two teachers' outputs and features."""
        out, feats = self.teacher_outputs(x_t, t, inputs, groups, want_features, labels)
        if mix is not None:
            partner_out, partner_feats = self.teacher_outputs(x_t, t, inputs, mix.partners, want_features, labels)
            out = mix.blend(out, partner_out)
            feats = {k: mix.blend(v, partner_feats[k]) for k, v in feats.items()}
        return out, feats

    def uncond_targets(self, batch, inputs: StepInputs, x_t, t, groups, styles, mix: Mixtures | None):
        """`loss.uncond_weight`: the empty caption's conditioning and the supervision for it at the same
        x_t, t. None when off."""
        if self.trainer.recipe.loss.uncond_weight <= 0:
            return None
        empty = self.conditioned(batch, inputs.latents, [""] * len(inputs.captions))
        return empty.cond, self.targets(x_t, t, empty, groups, False, styles, mix)[0]

    def disc_logits(self, x0, cond: Conditioning):
        tr = self.trainer
        t = tr.randint(tr.recipe.loss.disc_t_max, x0.shape[0])
        noise = tr.randn(x0.shape)
        x_t = add_noise(x0, noise, t, tr.base.alphas_cumprod)
        return tr.models["disc"](x_t, t, cond.encoder_hidden_states, cond.added_cond_kwargs)

    # ------------------------------------------------------------- the step
    def micro_step(self, batch, styles, scale, groups):
        """Forward and backward of both losses (gradients accumulate, scaled by `scale`); the
        optimizers step in the trainer. The discriminator's forward passes do not depend on the
        student's weights, so stepping both after the last micro-step is exact."""
        tr, r = self.trainer, self.trainer.recipe
        num_styles = len(tr.student_styles)
        styles = self.class_labels(styles)  # supervisor slots -> the student's style indices
        inputs = self.inputs(batch)
        t, x_t = self.noised(inputs.latents)
        want_feat = r.loss.lambda_feat > 0
        cond = inputs.cond

        mix = self.mixtures(styles, groups)
        teacher_out, teacher_feats = self.targets(x_t, t, inputs, groups, want_feat, styles, mix)
        student_styles = styles if mix is None else mix.weights
        uncond = self.uncond_targets(batch, inputs, x_t, t, groups, styles, mix)
        student = tr.models["student"]
        hooks = BlockFeatures(student) if want_feat else contextlib.nullcontext()
        n = x_t.shape[0]
        with tr.autocast(), hooks as recorder:
            if uncond is None:
                student_out = student(x_t, t, cond.encoder_hidden_states, class_labels=student_styles,
                                      **cond.unet_kwargs()).sample
            else:  # one forward of both branches: [captioned rows, empty-caption rows]
                both = cond.cat(uncond[0])
                out = student(torch.cat([x_t, x_t]), torch.cat([t, t]), both.encoder_hidden_states,
                              class_labels=torch.cat([student_styles, student_styles]), **both.unet_kwargs()).sample
                student_out, student_uncond = out[:n], out[n:]
        losses = {"score": score_distillation_loss(student_out, teacher_out)}
        losses.update(score_parts(student_out, teacher_out, groups, tr.slot_names))  # per teacher, for TensorBoard
        total = losses["score"]
        if uncond is not None:
            losses["uncond"] = score_distillation_loss(student_uncond, uncond[1])
            total = total + r.loss.uncond_weight * losses["uncond"]
        if want_feat:
            feats = recorder.outputs if uncond is None else {k: v[:n] for k, v in recorder.outputs.items()}
            losses["feat"] = feature_imitation_loss(feats, teacher_feats)
            total = total + r.loss.lambda_feat * losses["feat"]
        # The adversarial losses see single-style samples only (a mixture has no class).
        keep = None if mix is None else (~mix.mixed).nonzero().flatten()
        adv = self.use_adv and (keep is None or keep.numel() > 0)
        if adv:
            x0_student = predict_x0(student_out, x_t, t, tr.base.alphas_cumprod, tr.base.prediction_type)
            disc_cond, disc_styles = cond, styles
            if keep is not None:
                x0_student, disc_cond, disc_styles = x0_student[keep], cond.select(keep), styles[keep]
            disc = tr.models["disc"]
            disc.requires_grad_(False)
            with tr.autocast():
                losses["gen"] = generator_loss(self.disc_logits(x0_student, disc_cond), disc_styles, num_styles)
            disc.requires_grad_(True)
            total = total + r.loss.lambda_adv * losses["gen"]
        losses["total"] = total
        tr.check_finite(losses)
        tr.engine.backward("student", total * scale if scale != 1.0 else total)

        if adv:
            x0_teacher = predict_x0(teacher_out, x_t, t, tr.base.alphas_cumprod, tr.base.prediction_type)
            if keep is not None:
                x0_teacher = x0_teacher[keep]
            with tr.autocast():
                fake = self.disc_logits(x0_student.detach(), disc_cond)
                real = self.disc_logits(x0_teacher, disc_cond)
                losses["disc"] = discriminator_loss(fake, real, disc_styles, num_styles)
            tr.check_finite({"disc": losses["disc"]})
            tr.engine.backward("disc", losses["disc"] * scale if scale != 1.0 else losses["disc"])
        return losses


__all__ = ["DMMObjective", "Mixtures", "StepInputs"]
