"""The registered weight-merging methods (the paper's baselines), each a recipe builder over sd-mecha.

A builder gets a `MergeJob` (the inputs as sd-mecha nodes, the base when given, the UNet config)
and its typed options, and returns the sd-mecha recipe whose merge is the result. Task vectors are
`model - base`; `scale` is the usual lambda that multiplies the combined task vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dmm.merge import mecha
from dmm.merge.inputs import MergeError
from dmm.models.arch import unet_blocks
from dmm.registry import Registry
from dmm.schema import ConfigError, setting

MERGE_METHODS: Registry = Registry("merge method")


@dataclass
class MergeJob:
    models: list[Any]          # sd-mecha nodes, one per --models entry
    base: Any | None           # sd-mecha node of --base, or None
    names: list[str]           # the inputs as given, for messages
    keys: list[str]            # the float keys being merged
    unet_config: dict | None   # from the first input's config.json, when it has one
    config: Any = None         # the sd-mecha model config

    def count(self, method: str, n: int | None = None, at_least: int | None = None, base: bool = False) -> None:
        """Refuse a wrong number of models, or a missing/unwanted --base, naming the method's needs."""
        got = len(self.models)
        if (n is not None and got != n) or (at_least is not None and got < at_least):
            want = f"exactly {n}" if n is not None else f"at least {at_least}"
            raise MergeError(f"{method} needs {want} --models, got {got}")
        if base and self.base is None:
            raise MergeError(f"{method} merges task vectors (model - base): give --base BASE")
        if not base and self.base is not None:
            raise MergeError(f"{method} takes no --base; drop it (or use add_difference, ties or dare)")

    def task_vectors(self) -> list[Any]:
        return [mecha.linear.subtract(m, self.base) for m in self.models]


@dataclass(frozen=True)
class WeightedSumOptions:
    weights: list[float] | None = setting(None, help="one weight per model (--weights); default: equal "  # noqa: RUF009
                                                     "weights")
    normalize: bool = setting(False, help="divide the weights by their sum; without it weights that do not "
                                          "sum to 1 are refused (they would rescale every weight)")


@MERGE_METHODS.register("weighted_sum", description="sum_i w_i * model_i (weights summing to 1)",
                        options=WeightedSumOptions)
def weighted_sum(job: MergeJob, options: WeightedSumOptions):
    job.count("weighted_sum", at_least=2)
    weights = resolve_weights(options.weights, len(job.models), options.normalize)
    # Each model read as a "delta" so sd-mecha's scale/add_difference primitives form the plain sum.
    recipe = mecha.linear.scale(job.models[0], alpha=mecha.scalar(weights[0]))
    for node, weight in zip(job.models[1:], weights[1:]):
        recipe = mecha.linear.add_difference(recipe, node, alpha=mecha.scalar(weight))
    return recipe


def resolve_weights(weights: list[float] | None, n: int, normalize: bool) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} models; give one weight per model")
    total = math.fsum(weights)
    if normalize:
        if total == 0:
            raise MergeError("the weights sum to 0 and cannot be normalised; give positive weights")
        return [w / total for w in weights]
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise MergeError(f"the weights sum to {total:g}, not 1; fix them or pass --option normalize=true")
    return list(weights)


@dataclass(frozen=True)
class AddDifferenceOptions:
    alpha: float = setting(1.0, help="multiplier of the difference B - C")


@MERGE_METHODS.register("add_difference", description="A + alpha * (B - C) for --models A B C",
                        options=AddDifferenceOptions)
def add_difference(job: MergeJob, options: AddDifferenceOptions):
    job.count("add_difference", n=3)
    a, b, c = job.models
    return mecha.linear.add_difference(a, mecha.linear.subtract(b, c), alpha=mecha.scalar(options.alpha))


@dataclass(frozen=True)
class TiesOptions:
    density: float = setting(0.2, gt=0, le=1, help="k: the fraction of each task vector's entries kept, "
                                                   "largest magnitudes first, per tensor")
    scale: float = setting(1.0, help="lambda: multiplier of the merged task vector")


@MERGE_METHODS.register("ties", description="TIES: trim task vectors to top-k by magnitude, elect signs, "
                        "disjoint mean, base + lambda * result", options=TiesOptions)
def ties(job: MergeJob, options: TiesOptions):
    job.count("ties", at_least=1, base=True)
    # vote_sgn=True elects the sign of the summed trimmed values (the paper's election);
    # ties_sum then averages, per entry, only the values that agree with it.
    merged = mecha.ties.ties_sum(*job.task_vectors(), k=options.density, vote_sgn=True)
    return mecha.linear.add_difference(job.base, merged, alpha=mecha.scalar(options.scale))


@dataclass(frozen=True)
class DareOptions:
    density: float = setting(0.5, gt=0, le=1, help="fraction of each task vector's entries kept at random; "
                                                   "kept entries are divided by it")
    seed: int = setting(0, ge=0, help="random seed; model i draws its masks with seed + i")
    scale: float = setting(1.0, help="lambda: multiplier of each rescaled task vector")


@MERGE_METHODS.register("dare", description="DARE: drop task-vector entries at random, rescale by 1/density, "
                        "base + lambda * sum", options=DareOptions)
def dare(job: MergeJob, options: DareOptions):
    job.count("dare", at_least=1, base=True)
    recipe = job.base
    for i, delta in enumerate(job.task_vectors()):
        # sd-mecha's dropout on ONE delta is exactly drop-and-rescale: numpy Bernoulli(density) mask
        # per tensor from default_rng(seed), kept entries / density.
        dropped = mecha.ties.dropout(delta, probability=1.0 - options.density, seed=options.seed + i)
        recipe = mecha.linear.add_difference(recipe, dropped, alpha=mecha.scalar(options.scale))
    return recipe


@dataclass(frozen=True)
class BlockWeightsOptions:
    alpha: float = setting(0.5, ge=0, le=1, help="share of model B in every block not named in `blocks`")
    blocks: dict[str, float] = setting(default_factory=dict, help="share of model B per block, e.g. "  # noqa: RUF009
                                       "{mid_block: 1.0, down_blocks.1: 0.2}; names from dmm.models.arch.unet_blocks")


@MERGE_METHODS.register("block_weights", description="(1 - a_block) * A + a_block * B with a share per UNet "
                        "block (SD1.5, SDXL, toy)", options=BlockWeightsOptions)
def block_weights(job: MergeJob, options: BlockWeightsOptions):
    job.count("block_weights", n=2)
    alphas = block_alphas(job, options)
    a, b = job.models
    return mecha.linear.weighted_sum(a, b, alpha=mecha.per_key(alphas, job.config))


def block_alphas(job: MergeJob, options: BlockWeightsOptions) -> dict[str, float]:
    """Each key's share of B: its block's entry in `blocks`, else `alpha`."""
    if job.unet_config is None:
        raise MergeError("block_weights needs the UNet's config.json to name its blocks: give diffusers "
                         "pipeline or UNet folders, not bare .safetensors files")
    names = unet_blocks(job.unet_config)
    for name, value in options.blocks.items():
        if name not in names:
            raise ConfigError(f"block_weights: unknown block {name!r}; this UNet's blocks: {names}")
        if not 0 <= value <= 1:
            raise ConfigError(f"block_weights: blocks.{name} must be within [0, 1], got {value}")
    return {key: options.blocks.get(block_of(key, names), options.alpha) for key in job.keys}


def block_of(key: str, names: list[str]) -> str | None:
    return next((n for n in names if key == n or key.startswith(n + ".")), None)


__all__ = ["MERGE_METHODS", "MergeJob", "block_of", "resolve_weights"]
