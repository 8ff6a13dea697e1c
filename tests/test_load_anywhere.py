"""A merged folder leaves Python's dmm: it loads with stock diffusers (`trust_remote_code`) in a
process where dmm cannot import, with `load_merged` from any working directory, never as a
silently style-less plain UNet, and into other stock pipelines through `from_pipe`."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dmm.models.student as student_module
from dmm.models.student import StyleUNet2DConditionModel
from dmm.pipeline import UNET_MODULE, MergedModelError, load_merged, load_plain_unet
from dmm.testing import make_tiny_pipeline
from dmm.train.export import build_student, export_merged

STYLES = ["neon", "flat"]
GEN = {"num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32, "output_type": "np"}


def make_merged(root, styles=STYLES):
    """A tiny merged folder whose styles really differ (the untrained codebook's output is zero)."""
    make_tiny_pipeline(root / "base", arch="sdxl")
    student = build_student(root / "base", list(styles), None)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in student.class_embedding.parameters():
            p.normal_(0, 0.5)
    return export_merged(student, root / "base", root / "merged")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return make_merged(tmp_path_factory.mktemp("anywhere"))


def reference_image(folder, style):
    pipe = load_merged(folder)
    pipe.unet.set_style(style)
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), **GEN).images


FRESH = textwrap.dedent("""
    import sys
    sys.path = [p for p in sys.path if p not in ("", {root!r})]
    sys.modules["dmm"] = None  # the editable install's finder would still find the package
    try:
        import dmm
    except ImportError:
        pass
    else:
        raise SystemExit("dmm is importable: the test would prove nothing")
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained({folder!r}, trust_remote_code=True, local_files_only=True)
    assert type(pipe.unet).__name__ == "StyleUNet2DConditionModel", type(pipe.unet)
    assert "dmm" not in type(pipe.unet).__module__, type(pipe.unet).__module__
    pipe.unet.set_style({style!r})
    out = pipe("a red circle", generator=torch.Generator().manual_seed(0), **{gen!r})
    np.save({out!r}, out.images)
""")


def test_fresh_process_without_dmm_loads_with_trust_remote_code(merged, tmp_path):
    out = tmp_path / "fresh.npy"
    root = str(inspect.getfile(student_module)).rsplit("/dmm/", 1)[0]
    code = FRESH.format(root=root, folder=str(merged), style={"neon": 0.25, "flat": 0.75}, gen=GEN, out=str(out))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(out), reference_image(merged, {"neon": 0.25, "flat": 0.75}), atol=1e-5)


def test_component_file_is_generated_from_the_student_module(merged):
    index = json.loads((merged / "model_index.json").read_text())
    assert index["unet"] == [UNET_MODULE, StyleUNet2DConditionModel.__name__]
    shipped = (merged / "unet" / f"{UNET_MODULE}.py").read_text()
    assert shipped.endswith(inspect.getsource(student_module)), "the shipped class drifted from dmm/models/student.py"
    assert not re.search(r"^\s*(from|import)\s+dmm\b", shipped, flags=re.MULTILINE), "it must not need dmm"


def test_load_merged_from_any_working_directory(merged, tmp_path, monkeypatch):
    (tmp_path / "dmm").mkdir()  # a folder that would shadow the package if the class were looked up by name
    monkeypatch.chdir(tmp_path)
    pipe = load_merged(os.path.relpath(merged, tmp_path))
    assert type(pipe.unet) is StyleUNet2DConditionModel
    assert pipe.unet.style_names == STYLES


def test_merged_unet_is_never_loaded_style_less(merged):
    with pytest.raises(MergedModelError, match=r"drop the styles.*bake"):
        load_plain_unet(merged / "unet")
    baked = load_plain_unet(merged / "unet", style="flat")
    assert type(baked).__name__ == "UNet2DConditionModel"
    ref = load_merged(merged).unet.bake("flat")
    for (k, a), (_, b) in zip(baked.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_from_pipe_to_img2img_with_the_unet_passed(merged):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = load_merged(merged)
    pipe.unet.set_style("neon")
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe, unet=pipe.unet)  # the README's one-line form
    assert img2img.unet is pipe.unet
    init = torch.rand(1, 3, 32, 32)
    out = img2img("a red circle", image=init, strength=0.9, generator=torch.Generator().manual_seed(0), **GEN)
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
