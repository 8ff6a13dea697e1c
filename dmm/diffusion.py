"""Prediction-type maths shared by losses, the discriminator input and the trainer.

Teachers may be epsilon-, v- or x0-parameterised; these helpers move between parameterisations
with the scheduler's own alphas_cumprod so the losses never assume one.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _coefficients(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor):
    a = alphas_cumprod.to(like.device, torch.float32)[t.long()]
    shape = (-1,) + (1,) * (like.dim() - 1)
    return a.sqrt().reshape(shape), (1 - a).sqrt().reshape(shape)


def check_prediction_type(kind: str) -> str:
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {kind!r}; known: {list(PREDICTION_TYPES)}")
    return kind


def predict_x0(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod, kind: str) -> torch.Tensor:
    """g(x_t, t): the clean sample implied by a model output of the given prediction type."""
    sa, sb = _coefficients(alphas_cumprod, t, x_t)
    out, x = output.float(), x_t.float()
    if kind == "epsilon":
        return (x - sb * out) / sa
    if kind == "v_prediction":
        return sa * x - sb * out
    if kind == "sample":
        return out
    raise ValueError(f"unknown prediction type {kind!r}; known: {list(PREDICTION_TYPES)}")


def predict_eps(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod, kind: str) -> torch.Tensor:
    sa, sb = _coefficients(alphas_cumprod, t, x_t)
    out, x = output.float(), x_t.float()
    if kind == "epsilon":
        return out
    if kind == "v_prediction":
        return sb * x + sa * out
    if kind == "sample":
        return (x - sa * out) / sb
    raise ValueError(f"unknown prediction type {kind!r}; known: {list(PREDICTION_TYPES)}")


def convert_prediction(output, x_t, t, alphas_cumprod, source: str, target: str) -> torch.Tensor:
    """Re-express a model output in another parameterisation (identity when they agree)."""
    if source == target:
        return output
    sa, sb = _coefficients(alphas_cumprod, t, x_t)
    x0 = predict_x0(output, x_t, t, alphas_cumprod, source)
    eps = predict_eps(output, x_t, t, alphas_cumprod, source)
    if target == "epsilon":
        return eps
    if target == "sample":
        return x0
    if target == "v_prediction":
        return sa * eps - sb * x0
    raise ValueError(f"unknown prediction type {target!r}; known: {list(PREDICTION_TYPES)}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod) -> torch.Tensor:
    sa, sb = _coefficients(alphas_cumprod, t, x0)
    return (sa * x0.float() + sb * noise.float()).to(x0.dtype)
