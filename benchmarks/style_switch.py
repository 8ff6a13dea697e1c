#!/usr/bin/env python
"""Switching styles: one merged model (`unet.set_style`) against the user's alternative of loading
the other teacher's UNet from disk (diffusers `UNet2DConditionModel.from_pretrained` of its
safetensors) and putting it into the pipeline.

  python benchmarks/style_switch.py --size toy     # assets/toyworld's 4 teachers, a merged model built from its base
  flock /tmp/dmm-bigmem.lock python benchmarks/style_switch.py --size sd15 --workdir /tmp/style-switch

Measured in one run, merged and alternative interleaved: the time to switch style A -> B, the
time per generation (toy: a pipeline call of --steps steps, one 32 px image; sd15: one UNet
forward at 512 px, batch 1, fp32), and the resident memory of N teachers' UNets loaded at once
against one merged UNet (parameter bytes, and the RSS growth measured in a fresh process each).
--size sd15 writes one random-init SD1.5 UNet (860M parameters, stored in --store-dtype) and its
merged counterpart once under --workdir and reuses them; teacher A, B and the N teachers are that
one file (same size and format as any SD1.5 fine-tune's UNet). Loads read from the page cache
(the files were just written or read): the alternative's best case; a cold disk is slower.
Prints markdown tables; --json also writes the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOY_PROMPT = "a large red circle in the top left"


def rss_bytes() -> int:
    """Resident set of this process now (not the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def dtype_of(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------- models on disk
def toy_models(workdir: Path, teachers: int) -> dict:
    """The shipped toy world's teachers, and a merged model exported from its base (the weights of a
    trained one would not change any figure here)."""
    from dmm.models.student import StyleUNet2DConditionModel
    from dmm.train.export import export_merged

    world = REPO / "assets" / "toyworld"
    paths = json.loads((world / "world.json").read_text())["paths"]["teachers"]
    names = list(paths)[:teachers]
    if len(names) < 2:
        raise SystemExit(f"--teachers {teachers}: need at least 2 (A and B); the toy world has {len(paths)}")
    merged = workdir / "toy_merged"
    if not (merged / "unet" / "config.json").is_file():
        from diffusers import UNet2DConditionModel

        base = UNet2DConditionModel.from_pretrained(str(world / "base" / "unet"), local_files_only=True)
        export_merged(StyleUNet2DConditionModel.from_unet(base, names), world / "base", merged)
    return {"names": names, "teacher_unets": [world / paths[n] / "unet" for n in names],
            "teacher_pipe": world / paths[names[0]], "merged": merged}


def sd15_models(workdir: Path, teachers: int, store_dtype: str) -> dict:
    """One random-init SD1.5 UNet and its merged counterpart, written once in `store_dtype`."""
    import torch
    from diffusers import UNet2DConditionModel

    from dmm.models.arch import sd15_unet_config
    from dmm.models.student import StyleUNet2DConditionModel

    names = [f"style{i}" for i in range(teachers)]
    teacher, merged = workdir / f"sd15_teacher_{store_dtype}" / "unet", workdir / f"sd15_merged_{store_dtype}" / "unet"
    if not (teacher / "config.json").is_file() or not (merged / "config.json").is_file():
        print(f"writing an SD1.5-sized UNet and its merged model ({store_dtype}) under {workdir} ...", flush=True)
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**sd15_unet_config())
        student = StyleUNet2DConditionModel.from_unet(unet, names)
        unet.to(dtype_of(store_dtype)).save_pretrained(str(teacher))
        del unet
        student.to(dtype_of(store_dtype)).save_pretrained(str(merged))
        del student
        gc.collect()
    return {"names": names, "teacher_unets": [teacher] * teachers, "merged": merged.parent}


# ----------------------------------------------------------------------------- measurements
def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def load_unet(folder: Path, dtype):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)


def load_merged_unet(folder: Path, dtype):
    from dmm.models.student import StyleUNet2DConditionModel

    return StyleUNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype, local_files_only=True)


def switch_times(models: dict, merged_unet, plain_holder, dtype, reps: int) -> tuple[list[float], list[float]]:
    """Merged: set_style to the other style. Alternative: load the other teacher's UNet and put it in
    `plain_holder` (a pipeline, or a dict standing in for one). Interleaved rep by rep."""
    a, b = models["teacher_unets"][0], models["teacher_unets"][1]
    names = models["names"]
    merged_t, alt_t = [], []
    for k in range(reps):
        target = b if k % 2 == 0 else a
        merged_t += timed(lambda name=names[1 - k % 2]: merged_unet.set_style(name), 1)
        t0 = time.perf_counter()
        unet = load_unet(target, dtype)
        if isinstance(plain_holder, dict):
            plain_holder["unet"] = unet
        else:
            plain_holder.unet = unet
        alt_t.append(time.perf_counter() - t0)
        del unet
        gc.collect()
    return merged_t, alt_t


def measure_toy(models: dict, args) -> dict:
    import torch
    from diffusers import DiffusionPipeline

    from dmm.pipeline import load_merged
    from dmm.sampling import sample_images

    merged = load_merged(models["merged"])
    teacher = DiffusionPipeline.from_pretrained(str(models["teacher_pipe"]), local_files_only=True)
    for pipe in (merged, teacher):
        pipe.set_progress_bar_config(disable=True)
    merged.unet.set_style(models["names"][0])
    # Warm both (first calls allocate); the switch timing starts after.
    gen = {"steps": args.steps, "guidance_scale": 3.0, "height": 32, "width": 32}
    sample_images(merged, [TOY_PROMPT], [0], **gen)
    sample_images(teacher, [TOY_PROMPT], [0], **gen)
    load_unet(models["teacher_unets"][1], torch.float32)
    merged_switch, alt_switch = switch_times(models, merged.unet, teacher, torch.float32, args.reps)
    merged_gen, alt_gen = [], []
    for k in range(args.reps):
        merged_gen += timed(lambda seed=k: sample_images(merged, [TOY_PROMPT], [seed], **gen), 1)
        alt_gen += timed(lambda seed=k: sample_images(teacher, [TOY_PROMPT], [seed], **gen), 1)
    return {"switch": (merged_switch, alt_switch), "generation": (merged_gen, alt_gen),
            "generation_what": f"pipeline call, {args.steps} steps, CFG, one 32 px image"}


def measure_sd15(models: dict, args) -> dict:
    import torch

    store = dtype_of(args.store_dtype)
    merged_unet = load_merged_unet(models["merged"], store)
    holder: dict = {}
    load_unet(models["teacher_unets"][0], store)  # warm: the file into the page cache, once
    merged_switch, alt_switch = switch_times(models, merged_unet, holder, store, args.reps)
    del merged_unet, holder
    gc.collect()

    # One UNet forward at 512 px (64 x 64 latents), fp32 (the CPU's fast path), merged and plain interleaved.
    merged_unet = load_merged_unet(models["merged"], torch.float32)
    merged_unet.set_style(models["names"][0])
    plain = load_unet(models["teacher_unets"][0], torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=g)
    t = torch.tensor([500])
    text = torch.randn(1, 77, 768, generator=g)
    merged_fwd, alt_fwd = [], []
    with torch.no_grad():
        for _ in range(args.fwd_reps):
            merged_fwd += timed(lambda: merged_unet(x, t, text), 1)
            alt_fwd += timed(lambda: plain(x, t, text), 1)
    return {"switch": (merged_switch, alt_switch), "generation": (merged_fwd, alt_fwd),
            "generation_what": "one UNet forward, 512 px, batch 1, fp32"}


def memory_child(kind: str, folders: list[str], dtype: str) -> None:
    """Run in a fresh process: load `kind` (N teachers, or one merged model) and report the RSS growth."""
    import diffusers  # noqa: F401  (imports are part of the baseline, not of the models)
    import torch  # noqa: F401

    import dmm.models.student  # noqa: F401

    gc.collect()
    before = rss_bytes()
    if kind == "teachers":
        loaded = [load_unet(Path(f), dtype_of(dtype)) for f in folders]
    else:
        loaded = [load_merged_unet(Path(folders[0]), dtype_of(dtype))]
    # diffusers leaves safetensors weights memory-mapped from the file (resident only once read);
    # copy them out, as any move to a device or dtype change does, so RSS holds them all.
    for module in loaded:
        for t in [*module.parameters(), *module.buffers()]:
            t.data = t.data.clone()
    gc.collect()
    after = rss_bytes()
    print(json.dumps({"rss_growth": after - before, "rss": after, "param_bytes": sum(map(param_bytes, loaded))}))


def measure_memory(models: dict, dtype: str) -> dict:
    out = {}
    for kind, folders in (("teachers", [str(f) for f in models["teacher_unets"]]), ("merged", [str(models["merged"])])):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", kind, "--store-dtype", dtype, *folders],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"memory measurement ({kind}) failed:\n{proc.stderr[-2000:]}")
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- report
def fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["toy", "sd15"], default="toy")
    p.add_argument("--teachers", type=int, default=4, help="N: teachers held in memory against one merged model")
    p.add_argument("--workdir", type=Path, default=None, help="where models are written (default: a temporary folder)")
    p.add_argument("--reps", type=int, default=None, help="switches and (toy) generations timed (default toy 10, sd15 3)")
    p.add_argument("--fwd-reps", type=int, default=2, help="sd15: UNet forwards timed per model")
    p.add_argument("--steps", type=int, default=4, help="toy: sampler steps per generation")
    p.add_argument("--store-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of the UNets on disk and in the memory figures (default toy float32, sd15 float16)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--only", choices=["all", "memory"], default="all", help="memory: skip the timings")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("folders", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.folders, args.store_dtype)
        return 0
    args.reps = args.reps or (10 if args.size == "toy" else 3)
    args.store_dtype = args.store_dtype or ("float32" if args.size == "toy" else "float16")
    if args.size == "toy" and args.store_dtype != "float32":
        raise SystemExit("--size toy uses the shipped float32 teachers: leave --store-dtype out")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="style-switch-") if args.workdir is None else None
    workdir = Path(tmp.name) if tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        models = toy_models(workdir, args.teachers) if args.size == "toy" else \
            sd15_models(workdir, args.teachers, args.store_dtype)
        timing = {} if args.only == "memory" else (measure_toy if args.size == "toy" else measure_sd15)(models, args)
        gc.collect()
        memory = measure_memory(models, args.store_dtype)
    finally:
        if tmp:
            tmp.cleanup()

    n = args.teachers
    if timing:
        med = {k: tuple(statistics.median(v) for v in pair) for k, pair in timing.items() if k != "generation_what"}
        print(f"\nstyle switch, size {args.size}, {n} styles, torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads, median of {args.reps} switches\n")
        print("| | one merged model | load the other teacher (diffusers from_pretrained) | ratio |")
        print("| --- | --- | --- | --- |")
        sm, sa = med["switch"]
        print(f"| switch style A -> B | {fmt_s(sm)} (set_style) | {fmt_s(sa)} | alternative {sa / sm:,.0f}x slower |")
        gm, ga = med["generation"]
        print(f"| {timing['generation_what']} | {fmt_s(gm)} | {fmt_s(ga)} | merged / teacher = {gm / ga:.3f} |")
    tm, mm = memory["teachers"], memory["merged"]
    print(f"\nresident memory, {n} teachers' UNets loaded at once against one merged UNet ({args.store_dtype}):\n")
    print(f"| | {n} teachers | one merged model | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| parameter bytes | {gib(tm['param_bytes'])} | {gib(mm['param_bytes'])} | "
          f"{tm['param_bytes'] / mm['param_bytes']:.2f}x |")
    print(f"| measured RSS growth (fresh process) | {gib(tm['rss_growth'])} | {gib(mm['rss_growth'])} | "
          f"{tm['rss_growth'] / mm['rss_growth']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "teachers": n, "store_dtype": args.store_dtype,
                                         "timing_s": {k: v for k, v in timing.items()}, "memory": memory}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
