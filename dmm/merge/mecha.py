"""The sd-mecha side of a merge: a model config registered from the inputs' header, recipe nodes
for each input, and one streaming `sd_mecha.merge` call with our settings.

sd-mecha recognises original-layout SD1.5/SDXL files by itself but not diffusers-layout or toy
UNets; registering a config built from the first input's key list (float tensors only) makes any
layout mergeable. Arithmetic runs in float64 and is rounded once to the inputs' dtype.

Worked around in sd-mecha 1.1.8 (pinned in pyproject.toml):
- the top-level wrappers `sd_mecha.add_difference` / `add_difference_ties` crash when their
  second input is a merge result (`NoneType has no attribute identifier` comparing merge spaces),
  and top-level `sd_mecha.dropout` yields an empty merge; we compose from the primitives in
  `sd_mecha.extensions.builtin.merge_methods.{linear,ties}` instead.
- a plain Python float parameter becomes a float32 tensor before the float64 arithmetic; scalars
  are passed as float64 tensors (`scalar`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging

import torch

from dmm.merge.inputs import FLOAT_DTYPES, MergeError

try:
    import sd_mecha
    from sd_mecha.extensions import model_configs
    from sd_mecha.extensions.builtin.merge_methods import linear, ties
except ImportError as err:  # a core dependency; only a broken environment gets here
    raise ImportError(f"dmm.merge needs the sd-mecha package ({err}); reinstall dmm: pip install -e .") from err

MERGE_DTYPE = torch.float64
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

__all__ = ["linear", "model", "per_key", "register_config", "run", "scalar", "ties"]


def register_config(header: dict):
    """An sd-mecha model config holding the header's float keys (registered once per key list)."""
    keys = {k: (shape, dtype) for k, (shape, dtype) in header.items() if dtype in FLOAT_DTYPES}
    digest = hashlib.sha1(repr(sorted(keys.items())).encode()).hexdigest()[:16]
    identifier = f"dmm{digest}-merge"
    try:
        return model_configs.resolve(identifier)
    except KeyError:
        pass
    meta = {k: model_configs.KeyMetadata(list(shape), str(TORCH_DTYPES[dtype]).removeprefix("torch."))
            for k, (shape, dtype) in keys.items()}
    config = model_configs.ModelConfigImpl(identifier, {"unet": meta})
    model_configs.register(config)
    return config


def model(path, config, merge_space: str = "weight"):
    return sd_mecha.model(str(path), config=config, merge_space=merge_space)


def scalar(value: float) -> torch.Tensor:
    """A float64 scalar: a plain float would be rounded to float32 before the float64 arithmetic."""
    return torch.tensor(float(value), dtype=MERGE_DTYPE)


def per_key(values: dict[str, float], config):
    """A per-key parameter (one float64 scalar per key), e.g. per-block alphas."""
    return sd_mecha.literal({k: scalar(v) for k, v in values.items()}, config=config)


class _Quiet:
    """A tqdm stand-in: no progress bar in logs and tests."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args, **kwargs):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


class _DropRecipeWarning(logging.Filter):
    """sd-mecha warns that a recipe holding tensor parameters (our float64 scalars) cannot be stored
    in the output's metadata; we drop that metadata anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "recipe graph could not be serialized" not in record.getMessage()


@contextlib.contextmanager
def _quiet_recipe_warning():
    root, drop = logging.getLogger(), _DropRecipeWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def run(recipe, *, output_dtype: torch.dtype, merge_space: str = "weight") -> dict[str, torch.Tensor]:
    """Stream the recipe key by key (sd-mecha reads one tensor of each input at a time)."""
    try:
        with _quiet_recipe_warning():
            out = sd_mecha.merge(recipe, merge_dtype=MERGE_DTYPE, output_dtype=output_dtype, threads=0,
                                 strict_merge_space=merge_space, omit_non_finite_inputs=False,
                                 check_extra_keys=False, tqdm=_Quiet)
    except (RuntimeError, ValueError, KeyError) as err:
        raise MergeError(f"sd-mecha could not merge: {err}") from err
    out.pop("__metadata__", None)
    return out
