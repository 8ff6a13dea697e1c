#!/usr/bin/env python
"""Throughput of one full distillation step, per engine: student forward/backward (score, feature
and generator losses), teacher forward, discriminator update, optimizer steps -- the trainer's own
`train_step` on pre-fetched batches (image decoding excluded, VAE/text encoding included).

  python benchmarks/step_throughput.py --engine none                  # one process
  python benchmarks/step_throughput.py --engine fsdp2 --ranks 2       # relaunches itself under torchrun
  python benchmarks/step_throughput.py --engine deepspeed --ranks 2 --zero-stage 2
  python benchmarks/step_throughput.py --engine all --ranks 2 --out results.jsonl
  python benchmarks/step_throughput.py --switches                     # each `perf:` switch on vs off
  python benchmarks/step_throughput.py --perf host_sync=log --perf channels_last=true

Reports samples/s (per rank and in total), seconds per step, peak memory (CUDA: max allocated;
CPU: peak resident set of rank 0), FLOPs of one step counted with torch.utils.flop_counter, the
achieved TFLOP/s and, on a GPU, MFU against --peak-tflops (default: the device's dense bf16
peak where known). --size tiny uses the test pipelines of dmm.testing; --size sd15 / sdxl put a
random-init full-size UNet (dmm.models.arch) into a pipeline with one-layer text encoders and a
small 8x VAE (the UNet dominates the step).
The paper's figure: 100k iterations x 320 samples in 32 A100-days = about 11.6 samples/s per A100
(SD1.5, 512 px).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def full_size_pipeline(folder: Path, arch: str) -> Path:
    """A random-init pipeline folder with the real SD1.5/SDXL UNet and small text encoders and VAE."""
    import torch
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dmm.models.arch import sd15_unet_config, sdxl_unet_config
    from dmm.testing import write_tokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(folder / "_tokenizer_src")), local_files_only=True)

    def text(hidden, proj=False):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
                             num_attention_heads=8, max_position_embeddings=16, projection_dim=1280,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return CLIPTextModelWithProjection(cfg) if proj else CLIPTextModel(cfg)

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                        latent_channels=4, norm_num_groups=8, layers_per_block=1)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", steps_offset=1)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text(768), text_encoder_2=text(1280, proj=True),
                                         tokenizer=tok, tokenizer_2=tok, unet=UNet2DConditionModel(**sdxl_unet_config()),
                                         scheduler=scheduler, force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text(768), tokenizer=tok,
                                       unet=UNet2DConditionModel(**sd15_unet_config()), scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def build_world(folder: Path, size: str, teachers: int, samples: int, resolution: int) -> dict:
    from dmm.testing import make_teacher, make_tiny_pipeline, write_shards

    done = folder / "world.json"
    if done.is_file():
        return json.loads(done.read_text())
    if size == "tiny":
        make_tiny_pipeline(folder / "base", "sdxl")
    else:
        full_size_pipeline(folder / "base", size)
    for i in range(teachers):
        make_teacher(folder / "base", folder / f"teacher{i}", seed=i + 1)
    shards = [str(p) for p in write_shards(folder / "shards", samples, per_shard=64, size=resolution)]
    info = {"teachers": teachers, "shards": shards}
    done.write_text(json.dumps(info))
    return info


def recipe_for(args, world: Path, info: dict):
    from dmm.recipes import parse_recipe

    return parse_recipe({
        "name": f"bench-{args.size}",
        "model": {"base": str(world / "base"), "teacher_dtype": args.teacher_dtype},
        "teachers": [{"name": f"style{i}", "path": str(world / f"teacher{i}")} for i in range(info["teachers"])],
        "data": {"shards": info["shards"], "resolution": args.resolution, "batch_size": args.batch,
                 "shuffle_buffer": 16},
        "train": {"max_steps": 10**6, "output_dir": str(world / f"run-{os.getpid()}"),
                  "mixed_precision": args.mixed_precision},
        "distributed": {"engine": args.engine, "options": {"zero_stage": args.zero_stage} if args.engine == "deepspeed" else {}},
        "perf": parse_perf(args.perf),
        "log": {"samples": False},
    })


# What `--switches` compares with the defaults, one at a time (recipe `perf:`; train.gradient_checkpointing).
SWITCHES = [["host_sync=log"], ["device_rng=on"], ["fused_adamw=on"], ["attention=classic"], ["channels_last=true"],
            ["compile=blocks"]]


def parse_perf(items: list[str] | None) -> dict:
    """`KEY=VALUE` strings into the recipe's perf section (true/false are booleans; the schema checks them)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--perf takes KEY=VALUE (a key of the recipe's perf section), got {item!r}")
        out[key.strip()] = {"true": True, "false": False}.get(value.strip().lower(), value.strip())
    return out


def measure(args) -> dict | None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dmm.train.trainer import DistillationTrainer

    world = Path(args.workdir)
    info = json.loads((world / "world.json").read_text())
    trainer = DistillationTrainer(recipe_for(args, world, info))
    engine = trainer.engine
    stream = iter(trainer.stream)
    a = trainer.accum_steps
    batches = [[next(stream) for _ in range(a)] for _ in range(args.warmup + args.steps + 1)]
    cuda = torch.cuda.is_available()
    for b in batches[: args.warmup]:
        trainer.train_step(b)
    engine.barrier()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for b in batches[args.warmup: args.warmup + args.steps]:
        trainer.train_step(b)
    if cuda:
        torch.cuda.synchronize()
    engine.barrier()
    seconds = (time.perf_counter() - start) / args.steps
    with FlopCounterMode(display=False) as counter:  # one more step, counted (not timed)
        trainer.train_step(batches[-1])
    flops = counter.get_total_flops()
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    from dmm.distributed import all_gather_object

    flops_all = float(sum(all_gather_object(float(flops))))
    if not engine.is_main:
        return None
    per_rank = args.batch * a / seconds
    result = {
        "engine": args.engine + (f"-zero{args.zero_stage}" if args.engine == "deepspeed" else ""),
        "size": args.size, "ranks": engine.world_size, "batch_per_rank": args.batch, "grad_accum": a,
        "resolution": args.resolution, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads_per_rank": torch.get_num_threads(), "s_per_step": round(seconds, 4),
        "samples_per_s_per_rank": round(per_rank, 3), "samples_per_s_total": round(per_rank * engine.world_size, 3),
        "peak_mem_mb_rank0": round(peak_mb, 1), "gflop_per_step_all_ranks": round(flops_all / 1e9, 3),
        "achieved_tflops_per_rank": round(flops_all / engine.world_size / seconds / 1e12, 5),
        "perf": " ".join(args.perf or []) or "defaults",
    }
    if cuda:
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        result["mfu"] = round(result["achieved_tflops_per_rank"] / peak, 4) if peak else None
    else:
        result["mfu"] = None  # no meaningful peak for a shared CPU
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="none", choices=["none", "deepspeed", "fsdp2", "all"])
    p.add_argument("--ranks", type=int, default=2, help="processes for deepspeed/fsdp2 (torchrun)")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--size", default="tiny", choices=["tiny", "sd15", "sdxl"])
    p.add_argument("--teachers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="per rank")
    p.add_argument("--resolution", type=int, default=None, help="default: 32 (tiny), 512 (sd15), 1024 (sdxl)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (CPU)")
    p.add_argument("--workdir", default=None, help="where the pipelines and shards are built (kept)")
    p.add_argument("--out", default=None, help="append the result as a JSON line")
    p.add_argument("--perf", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe perf switch (repeatable), e.g. host_sync=log, channels_last=true")
    p.add_argument("--switches", action="store_true",
                   help="measure the defaults, then each perf switch alone, in one run; print a table with ratios")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.resolution = args.resolution or {"tiny": 32, "sd15": 512, "sdxl": 1024}[args.size]

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        result = measure(args)
        if result is not None:
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"dmm-bench-{args.size}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    build_world(workdir, args.size, args.teachers, max(64, args.batch * 8 * max(1, args.ranks)), args.resolution)
    engines = ["none", "deepspeed", "fsdp2"] if args.engine == "all" else [args.engine]
    if args.switches:
        return compare_switches(args, workdir)
    for engine in engines:
        argv = [a for a in sys.argv[1:] if not a.startswith("--engine") and a not in engines + ["all"]]
        argv += ["--engine", engine, "--workdir", str(workdir), "--worker"]
        if engine == "none":
            cmd = [sys.executable, __file__, *argv]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(args.ranks), __file__, *argv]
        done = subprocess.run(cmd, cwd=REPO)
        if done.returncode != 0:
            print(f"error: the {engine} measurement failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
    return 0


def compare_switches(args, workdir: Path) -> int:
    """Defaults, then each switch alone, then the defaults again (the machine's drift shows), one
    process each, the same world and batches; a markdown table with each row's ratio to the defaults."""
    results = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
    base = [a for a in sys.argv[1:] if a != "--switches" and not a.startswith("--perf")]
    for perf in [[], *SWITCHES, []]:
        cmd = [sys.executable, __file__, *base, "--workdir", str(workdir), "--worker", "--out", results,
               *[f"--perf={p}" for p in perf]]
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            print(f"error: the measurement with {perf or 'the defaults'} failed", file=sys.stderr)
            return 1
    rows = [json.loads(line) for line in Path(results).read_text().splitlines()]
    ref = (rows[0]["s_per_step"] + rows[-1]["s_per_step"]) / 2
    print("| perf switch | s / step | vs defaults (mean of first and last run) | samples/s | peak memory MB |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['perf']} | {row['s_per_step']} | {row['s_per_step'] / ref:.2f}x | "
              f"{row['samples_per_s_total']} | {row['peak_mem_mb_rank0']} |")
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
