"""The `dmm` command line, run in-process through `dmm.cli.main`: styles, generate (PNGs + grid),
export (a baked stock diffusers folder); bad input is one `error:` line with exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image

from dmm.cli import VERBS, main
from dmm.pipeline import generate, load_merged
from tests.test_load_anywhere import make_merged

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "2", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return make_merged(tmp_path_factory.mktemp("cli"))


def error_of(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_styles_lists_names_with_indices(merged, capsys):
    assert main(["styles", str(merged)]) == 0
    assert capsys.readouterr().out.splitlines() == ["0\tneon", "1\tflat"]


def test_generate_writes_pngs_and_a_grid_equal_to_the_library(merged, tmp_path, capsys):
    out = tmp_path / "images"
    argv = ["generate", "--model", merged, "--prompt", "a red circle", "--style", "0.3*neon+0.7*flat",
            "--n", "3", "--seed", "5", "--batch-size", "2", "--out", out, *SMALL]
    assert main([str(a) for a in argv]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (64, 64)
    ref = generate(load_merged(merged), ["a red circle"] * 3, {"neon": 0.3, "flat": 0.7}, seed=5, steps=2,
                   height=32, width=32)
    for k in range(3):
        got = np.asarray(Image.open(out / f"{k:04d}.png"), dtype=np.int16)
        assert np.abs(got - np.asarray(ref[k], dtype=np.int16)).max() <= 1, f"image {k}"


def test_export_diffusers_bakes_a_stock_folder(merged, tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "neon_model"
    assert main(["export", "--model", str(merged), "--style", "neon", "--format", "diffusers", "--out", str(out)]) == 0
    plain = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)  # no remote code, no dmm class
    assert type(plain.unet) is UNet2DConditionModel
    assert not (out / "unet" / "style_unet.py").exists()
    pipe = load_merged(merged)
    pipe.unet.set_style("neon")
    kw = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}
    a = plain("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_single_file_export_refuses_toy_models(merged, tmp_path, capsys):
    """Only full-size SD1.5/SDXL have an A1111/ComfyUI layout (tests/test_export_single_file.py)."""
    err = error_of(capsys, ["export", "--model", merged, "--style", "neon", "--format", "single-file",
                            "--out", tmp_path / "x.safetensors"])
    assert "not the full-size" in err and "--format diffusers" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_failed_export_keeps_the_existing_folder(merged, tmp_path, capsys):
    out = tmp_path / "kept"
    out.mkdir()
    (out / "marker").write_text("old")
    err = error_of(capsys, ["export", "--model", merged, "--style", "pixel", "--out", out])
    assert "unknown style 'pixel'" in err and "['neon', 'flat']" in err
    assert (out / "marker").read_text() == "old"


@pytest.mark.parametrize("extra, message", [
    (["--style", "pixel"], r"unknown style 'pixel'; known styles: \['neon', 'flat'\]"),
    (["--style", "0.3*neon+0.3*flat"], "sum to 1"),
    (["--style=-0.5*neon+1.5*flat"], "non-negative"),
    (["--style", "half*neon"], "WEIGHT\\*NAME"),
    (["--style", "neon", "--steps", "0"], "--steps must be"),
    (["--style", "neon", "--n", "0"], "--n must be at least 1"),
])
def test_generate_bad_input_is_one_line_before_any_weights_load(merged, tmp_path, capsys, extra, message):
    err = error_of(capsys, ["generate", "--model", merged, "--prompt", "x", "--out", tmp_path / "o", *extra])
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_not_a_merged_model_and_missing_flags(tmp_path, capsys):
    assert "no model_index.json" in error_of(capsys, ["styles", tmp_path])
    assert "--model" in error_of(capsys, ["generate", "--prompt", "x", "--style", "a", "--out", tmp_path])
    assert "invalid choice" in error_of(capsys, ["mergee"])


@pytest.mark.parametrize("verb", ["styles", "generate", "export", "merge"])
def test_every_verb_has_help(verb, capsys):
    assert main([verb, "--help"]) == 0
    assert f"usage: dmm {verb}" in capsys.readouterr().out


def test_a_registered_verb_joins_the_command_line(capsys):
    @VERBS.register("hello", description="say hello")
    class Hello:
        @staticmethod
        def arguments(parser):
            parser.add_argument("--name", default="world")

        @staticmethod
        def run(args):
            print(f"hello {args.name}")
            return 0

    try:
        assert main(["hello", "--name", "dmm"]) == 0
        assert capsys.readouterr().out == "hello dmm\n"
    finally:
        VERBS.remove("hello")


def test_console_script_and_python_m(merged):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dmm"] == "dmm.cli:main"
    # `python -m dmm` in one fresh process (runpy is what -m runs); `dmm styles` must not import sd-mecha
    code = ("import runpy, sys\n"
            "sys.argv = ['dmm', 'styles', sys.argv[1]]\n"
            "try:\n    runpy.run_module('dmm', run_name='__main__')\nexcept SystemExit as stop:\n    code = stop.code\n"
            "assert 'sd_mecha' not in sys.modules, 'dmm styles imported the merge verb'\n"
            "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(merged)], check=False, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "neon", "1", "flat"]
