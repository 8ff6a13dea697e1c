#!/usr/bin/env python
"""Peak resident memory of loading one single-file teacher, relative to what the loaded teacher
holds (its UNet, plus its text encoders when loaded), old loader vs new, in fresh processes.

Writes random-init original-layout (LDM/SGM) single files with the key names and shapes real
community checkpoints have (sd-mecha's sd1-ldm / sdxl-sgm lists: UNet, VAE, text encoders) and a
base folder holding only configs (the loaders need the base's UNet and text-encoder configs, not
its weights), then loads each file in a fresh subprocess with

  old   the loader before the streaming change (commit c5239bb): safetensors' load_file of the
        whole file, then diffusers' from_single_file reading it again, then .to(dtype)
  base  dmm.teachers.load_teacher_parts(text_encoder="base"): the UNet only
  own   dmm.teachers.load_teacher_parts(text_encoder="own"): the UNet and the file's text encoders

and reports the process's peak RSS (VmHWM) above its RSS just before loading, divided by the
bytes of the loaded parameters. Run the full-size ones under the shared memory lock:

  flock /tmp/dmm-bigmem.lock python benchmarks/teacher_loading.py --arch sd15 --file-dtype float16 float32
  flock /tmp/dmm-bigmem.lock python benchmarks/teacher_loading.py --arch sdxl --file-dtype float16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MECHA = {"sd15": "sd1-ldm", "sdxl": "sdxl-sgm"}
COMPONENTS = {"sd15": ("diffuser", "vae", "clip_l"), "sdxl": ("diffuser", "vae", "clip_l", "clip_g")}


def _clip_configs(arch: str) -> dict:
    from transformers import CLIPTextConfig

    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=768)
    if arch == "sd15":
        return {"text_encoder": ("CLIPTextModel", clip_l)}
    clip_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                            projection_dim=1280)
    return {"text_encoder": ("CLIPTextModel", clip_l), "text_encoder_2": ("CLIPTextModelWithProjection", clip_g)}


def write_base(folder: Path, arch: str) -> Path:
    """A base folder with configs only: model_index.json, unet/config.json, text_encoder*/config.json."""
    import torch
    from diffusers import UNet2DConditionModel

    from dmm.io import atomic_write_json
    from dmm.models.arch import sd15_unet_config, sdxl_unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(sd15_unet_config() if arch == "sd15" else sdxl_unet_config()))
    unet.save_config(str(folder / "unet"))
    index = {"_class_name": "StableDiffusionPipeline" if arch == "sd15" else "StableDiffusionXLPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"]}
    for name, (cls, config) in _clip_configs(arch).items():
        config.save_pretrained(str(folder / name))
        index[name] = ["transformers", cls]
    atomic_write_json(folder / "model_index.json", index)
    return folder


def write_file(path: Path, arch: str, dtype: str) -> Path:
    """Random weights under every key a real original-layout file of `arch` has (no EMA copy)."""
    import torch
    from safetensors.torch import save_file
    from sd_mecha.extensions import model_configs

    components = model_configs.resolve(MECHA[arch]).components()
    g = torch.Generator().manual_seed(0)
    state = {}
    for component in COMPONENTS[arch]:
        for key, meta in components[component].keys().items():
            shape = tuple(meta.shape)
            if key.endswith("position_ids"):
                state[key] = torch.arange(shape[-1])[None]
            elif str(meta.dtype).startswith("torch.int") or "int" in str(meta.dtype):
                state[key] = torch.zeros(shape, dtype=torch.int64)
            else:
                state[key] = (torch.randn(shape, generator=g) * 0.02).to(getattr(torch, dtype))
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return path


def _old_loader(path: Path, base: Path, dtype):
    """The single-file loader as it was before streaming (commit c5239bb, LDM branch)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    state = load_file(str(path))  # noqa: F841 - held while diffusers reads the file again, as before
    return [UNet2DConditionModel.from_single_file(str(path), config=str(base), subfolder="unet",
                                                  local_files_only=True).to(dtype)]


def _high_water_mark() -> int:
    """Peak RSS of this process's own memory (VmHWM). Not ru_maxrss: Linux carries the parent's
    RSS at fork over an exec into the child's ru_maxrss, so a big driver would mask the figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(mode: str, path: Path, base: Path, dtype_name: str) -> dict:
    # Everything either loader imports, imported first: the figure is the loading, not the imports.
    import accelerate  # noqa: F401
    import psutil
    import torch
    import transformers  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401
    from diffusers.loaders import single_file_utils  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    import dmm.teachers  # noqa: F401

    dtype = getattr(torch, dtype_name)
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if mode == "old":
        modules = _old_loader(path, base, dtype)
    else:
        from dmm.teachers import load_teacher_parts

        parts = load_teacher_parts(path, base=base, dtype=dtype, text_encoder=mode)
        modules = [parts.unet, *parts.encoders().values()]
    seconds = time.perf_counter() - start
    peak = _high_water_mark()
    held = sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))
    return {"mode": mode, "dtype": dtype_name, "loaded_gib": held / 2**30, "rss_before_gib": before / 2**30,
            "peak_rss_gib": peak / 2**30, "peak_above_before_gib": (peak - before) / 2**30,
            "ratio": (peak - before) / held, "seconds": seconds, "parts": len(modules)}


def _estimate(path: Path, arch: str, teacher_dtype: str, mode: str) -> int:
    """Rough peak of one measurement: the UNet in the teacher dtype, plus the file for the old loader."""
    params = {"sd15": 0.86e9, "sdxl": 2.57e9}[arch] + (0 if mode != "own" else {"sd15": 0.123e9, "sdxl": 0.82e9}[arch])
    size = params * (4 if teacher_dtype == "float32" else 2)
    return int(1.6e9 + size + (path.stat().st_size if mode == "old" else 0.3 * size))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--file-dtype", nargs="+", default=["float16"], choices=["float16", "float32"])
    parser.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["old", "base", "own"], choices=["old", "base", "own"])
    parser.add_argument("--work", default="/tmp/dmm-teacher-loading", help="folder for the files (kept)")
    parser.add_argument("--out", default="", help="append JSON lines here")
    parser.add_argument("--write", nargs=3, metavar=("FILE", "ARCH", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=4, metavar=("MODE", "FILE", "BASE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import psutil

    if args.write:
        write_file(Path(args.write[0]), args.write[1], args.write[2])
        return 0
    if args.measure:
        mode, file, base, dtype = args.measure
        print(json.dumps(measure(mode, Path(file), Path(base), dtype)))
        return 0
    work = Path(args.work)
    base = work / f"base-{args.arch}"
    if not (base / "model_index.json").is_file():
        write_base(base, args.arch)
    for file_dtype in args.file_dtype:
        path = work / f"{args.arch}-{file_dtype}.safetensors"
        if not path.is_file():
            print(f"writing {path} ...", flush=True)  # in a child: this driver must stay small (see _estimate)
            subprocess.run([sys.executable, __file__, "--write", str(path), args.arch, file_dtype], check=True)
        for mode in args.modes:
            need = _estimate(path, args.arch, args.teacher_dtype, mode)
            available = psutil.virtual_memory().available
            if available < need:  # never push the shared machine into the OOM killer
                print(json.dumps({"arch": args.arch, "file_dtype": file_dtype, "mode": mode, "skipped":
                                  f"needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"}))
                continue
            run = subprocess.run([sys.executable, __file__, "--measure", mode, str(path), str(base),
                                  args.teacher_dtype], check=False, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"{mode} failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
                continue
            row = {"arch": args.arch, "file_dtype": file_dtype, "file_gib": path.stat().st_size / 2**30,
                   **json.loads(run.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
