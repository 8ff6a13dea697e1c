#!/usr/bin/env python
"""Where a toy student still differs from its teachers: the distillation error on held-out images,
by style, timestep band and conditioning (captioned, empty caption, and the CFG-guided output).

A FID row of the toy world costs ~1.5k sampled images (20 steps x CFG each); this costs one
batched UNet pass per conditioning and model, so it can follow a run's checkpoints (and their weight average, a stand-in for an EMA
of the student) where sampling every one would not fit on a shared CPU.

  python benchmarks/toy_distill_error.py --recipe runs/ablate/base/recipe.yaml \
      --model runs/ablate/base/checkpoints/step-00000500 \
      --average runs/ablate/base/checkpoints/step-00000400,runs/ablate/base/checkpoints/step-00000500

For every style i the student (style i) and teacher i see the same noisy latents x_t of held-out
toy images (all styles, as in training), one t per image in each of --bands equal timestep bands.
Printed per model: the v-prediction MSE to the teacher, as a share of the base UNet's MSE to the
same teacher ("gap left": 1.0 = no better than the untrained base, 0 = the teacher), per band
and per conditioning; `--json` writes every number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _student(spec: str, base: str, names: list[str]):
    """`spec`: a checkpoint folder of the `none` engine (student.safetensors), or several joined by
    ',' (their uniform weight average)."""
    from safetensors.torch import load_file

    from dmm.train.export import build_student

    states = []
    for p in spec.split(","):
        f = Path(p) / "student.safetensors"
        if not f.is_file():
            raise SystemExit(f"error: {f} not found: pass a checkpoint folder of a one-process (engine none) run")
        states.append(load_file(str(f)))
    avg = {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}
    return build_student(base, names, avg).eval()


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="a run's recipe.yaml (base and teachers)")
    ap.add_argument("--model", action="append", default=[],
                    help="a checkpoint folder (repeatable; the base UNet is always scored, as the reference)")
    ap.add_argument("--average", action="append", default=[],
                    help="checkpoint folders joined by ',': their uniform weight average (repeatable)")
    ap.add_argument("--images", type=int, default=64, help="held-out images (default 64)")
    ap.add_argument("--bands", type=int, default=10, help="equal timestep bands (default 10)")
    ap.add_argument("--seed", type=int, default=777, help="seed of the held-out images and noise (training uses 0)")
    ap.add_argument("--guidance-scale", type=float, default=3.0, help="CFG of the guided output (default 3)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--json", help="write all numbers here")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    from diffusers import UNet2DConditionModel

    from dmm.conditioning import FrozenPipeline
    from dmm.diffusion import add_noise
    from dmm.recipes import load_recipe
    from dmm.toyworld.render import render_arrays

    recipe = load_recipe(args.recipe)
    names = list(recipe.style_names)
    base = FrozenPipeline(recipe.model.base, resolution=recipe.data.resolution)
    pix, contents, _ = render_arrays(args.images, args.seed, names)
    captions = [c.caption for c in contents]
    x0 = base.encode_images(torch.from_numpy(pix).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    g = torch.Generator().manual_seed(args.seed)
    n, k = args.images, args.bands
    width = base.num_train_timesteps // k
    t = (torch.arange(k).repeat_interleave(n) * width + torch.randint(0, width, (n * k,), generator=g))
    x0 = x0.repeat(k, 1, 1, 1)
    x_t = add_noise(x0, torch.randn(x0.shape, generator=g), t, base.alphas_cumprod)
    conds = {"cond": base.encode_captions(captions * k), "uncond": base.encode_captions([""] * (n * k))}

    def run(unet, style: int | None) -> dict[str, torch.Tensor]:
        out = {}
        for which, c in conds.items():
            parts = []
            for s in range(0, n * k, args.batch):
                idx = torch.arange(s, min(s + args.batch, n * k))
                sub = c.select(idx)
                extra = {} if style is None else {"class_labels": torch.full((len(idx),), style)}
                parts.append(unet(x_t[idx], t[idx], sub.encoder_hidden_states, **extra, **sub.unet_kwargs()).sample)
            out[which] = torch.cat(parts)
        out["guided"] = out["uncond"] + args.guidance_scale * (out["cond"] - out["uncond"])
        return out

    def errors(pred: dict, target: dict) -> dict[str, list[float]]:
        """MSE per band for each conditioning (bands in order of t)."""
        return {w: ((pred[w] - target[w]) ** 2).mean(dim=(1, 2, 3)).view(k, n).mean(1).tolist() for w in pred}

    base_unet = base.unet.eval()
    teachers = {}
    for i, spec in enumerate(recipe.teachers):
        unet = UNet2DConditionModel.from_pretrained(str(Path(spec.path) / "unet"), local_files_only=True).eval()
        teachers[i] = run(unet, None)
        print(f"teacher {spec.name}: done", file=sys.stderr, flush=True)
    results = {"settings": {k2: v for k2, v in vars(args).items() if k2 != "json"}, "band_width": width, "models": {}}
    base_out = run(base_unet, None)  # no style input: one pass serves every teacher
    floor = {names[i]: errors(base_out, teachers[i]) for i in teachers}
    results["models"]["base"] = floor
    specs = args.model + args.average
    for spec in specs:
        student = _student(spec, recipe.model.base, names)
        results["models"][spec] = {names[i]: errors(run(student, i), teachers[i]) for i in teachers}
        print(f"{spec}: done", file=sys.stderr, flush=True)

    print(f"v-MSE to the teacher / base's v-MSE to it ({n} held-out images x {k} bands of {width} steps)")
    for label, per_style in results["models"].items():
        print(f"\n== {label}")
        print(f"{'style':8} {'cond':>6} {'uncond':>7} {'guided':>7} | guided by band (t low -> high)")
        for s, errs in per_style.items():
            ratio = {w: np.mean(errs[w]) / np.mean(floor[s][w]) for w in errs}
            bands = " ".join(f"{e / f:.2f}" for e, f in zip(errs["guided"], floor[s]["guided"]))
            print(f"{s:8} {ratio['cond']:6.3f} {ratio['uncond']:7.3f} {ratio['guided']:7.3f} | {bands}")
        print("absolute guided v-MSE: " + " ".join(f"{s}={np.mean(e['guided']):.4f}" for s, e in per_style.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
