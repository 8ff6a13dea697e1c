"""Weight-merging baselines: the paper's "just average the checkpoints" next to distillation.

`merge_models(method, models, out, ...)` checks the inputs' headers against each other, builds the
registered method's sd-mecha recipe, streams it tensor by tensor and writes the result atomically:
a `.safetensors` file (same layout as the inputs), or a diffusers folder holding the base's (else
the first model's) other components with the merged UNet. Methods are entries of
`MERGE_METHODS` (kind "merge method"); `python -m dmm.merge --help` lists them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dmm.io import atomic_save_safetensors, atomic_write_json, make_dir, replace_dir
from dmm.merge.inputs import FLOAT_DTYPES, MergeError, MergeInput, check_compatible, resolve_input
from dmm.merge.methods import MERGE_METHODS, MergeJob


def merge_models(method: str, models: list[str | Path], out: str | Path, *, base: str | Path | None = None,
                 options: dict | None = None) -> Path:
    """Merge `models` (and `base`) with a registered method; returns the written path."""
    entry = MERGE_METHODS.get(method)
    parsed = entry.parse_options(options, where=f"{method} options")
    inputs = [resolve_input(p) for p in models]
    base_input = resolve_input(base) if base is not None else None
    out = Path(out)
    _check_out(out, inputs + ([base_input] if base_input else []))
    header = check_compatible(inputs + ([base_input] if base_input else []))

    from dmm.merge import mecha

    config = mecha.register_config(header)
    space = "delta" if method == "weighted_sum" else "weight"  # weighted_sum sums scaled "deltas"
    nodes = [mecha.model(i.weights, config, space) for i in inputs]
    job = MergeJob(models=nodes, base=mecha.model(base_input.weights, config) if base_input else None,
                   names=[str(p) for p in models], keys=[k for k, (_, d) in header.items() if d in FLOAT_DTYPES],
                   unet_config=(base_input or inputs[0]).unet_config(), config=config)
    recipe = entry.obj(job, parsed)
    dtypes = [d for _, d in header.values() if d in FLOAT_DTYPES]
    merged = mecha.run(recipe, output_dtype=mecha.TORCH_DTYPES[max(set(dtypes), key=dtypes.count)],
                       merge_space=space)
    merged = {k: merged[k].contiguous() for k in header if k in merged}
    _check_finite(merged, inputs + ([base_input] if base_input else []))
    _copy_non_float(header, inputs[0], merged)
    return _write(merged, out, base_input or inputs[0])


def _check_out(out: Path, inputs: list[MergeInput]) -> None:
    for i in inputs:
        if out.resolve() in (i.path.resolve(), i.weights.resolve()):
            raise MergeError(f"--out {out} is one of the inputs; write the merge somewhere else")
    if out.suffix != ".safetensors" and out.exists() and not out.is_dir():
        raise MergeError(f"--out {out} is an existing file; give a folder or a .safetensors path")


def _check_finite(merged: dict, inputs: list[MergeInput]) -> None:
    """A NaN or inf in any input spreads into the merge: refuse it before anything is written."""
    bad = next((k for k, v in merged.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        from safetensors import safe_open

        culprits = []
        for i in inputs:
            with safe_open(str(i.weights), "pt") as handle:
                if not torch.isfinite(handle.get_tensor(bad)).all():
                    culprits.append(str(i.path))
        raise MergeError(f"the merged {bad!r} is not finite: NaN/inf in {', '.join(culprits) or 'the merge itself'}; "
                         "repair or drop that model")


def _copy_non_float(header: dict, first: MergeInput, merged: dict) -> None:
    """Integer buffers (e.g. position ids of a full single file) are not merged: the first model's."""
    rest = [k for k, (_, d) in header.items() if d not in FLOAT_DTYPES]
    if rest:
        from safetensors import safe_open

        with safe_open(str(first.weights), "pt") as handle:
            for key in rest:
                merged[key] = handle.get_tensor(key)


def _write(merged: dict, out: Path, source: MergeInput) -> Path:
    """`.safetensors` file, or a folder swapped in whole: an existing output survives a failure."""
    if out.suffix == ".safetensors":
        atomic_save_safetensors(merged, out)
        return out
    if source.unet_dir is None:
        raise MergeError(f"--out {out}: a diffusers folder needs a UNet config, but the inputs are bare "
                         ".safetensors files; give --out NAME.safetensors")
    tmp = out.with_name(f".{out.name}.merging")  # a crashed merge's leftover is stale: start afresh
    if tmp.exists():
        shutil.rmtree(tmp)
    make_dir(tmp)
    try:
        if source.pipeline is not None:
            shutil.copytree(source.pipeline, tmp, dirs_exist_ok=True, ignore=lambda d, names: [
                n for n in names if Path(d) == source.pipeline and n == "unet"])
            unet = tmp / "unet"
        else:
            unet = tmp
        atomic_write_json(unet / "config.json", source.unet_config())
        atomic_save_safetensors(merged, unet / "diffusion_pytorch_model.safetensors")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["MERGE_METHODS", "MergeError", "merge_models"]
