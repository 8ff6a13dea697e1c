"""Regional styles (dmm.regions): one image, a style per region, through the stock SD and SDXL
pipelines. One region over the whole canvas is plain generation; two regions take their own
styles; the blend weights are a smooth partition of unity; the hook never outlives its block;
bad layouts are refused naming the region; the `dmm regions` command writes the PNG."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from dmm.cli import main
from dmm.pipeline import load_merged
from dmm.regions import (
    BLENDS,
    Region,
    RegionError,
    generate_regions,
    panorama_regions,
    parse_layout,
    plan_tiles,
    regional_styles,
)
from dmm.testing import make_tiny_pipeline
from dmm.train.export import build_student, export_merged
from tests.test_load_anywhere import make_merged

STYLES = ["neon", "flat"]
SMALL = {"steps": 3, "output_type": "np"}


def make_merged_sd15(root):
    """Like test_load_anywhere.make_merged, SD1.5-shaped (one text encoder, no size ids)."""
    make_tiny_pipeline(root / "base", arch="sd15")
    student = build_student(root / "base", STYLES, None)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in student.class_embedding.parameters():
            p.normal_(0, 0.5)
    return export_merged(student, root / "base", root / "merged")


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def pipe(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"regions_{request.param}")
    pipe = load_merged(make_merged(root) if request.param == "sdxl" else make_merged_sd15(root))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain(pipe, style, width, height, prompt="a red circle", seed=0, steps=3):
    pipe.unet.set_style(style)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, guidance_scale=3.0,
                width=width, height=height, output_type="np").images[0]


def test_one_region_over_the_canvas_is_plain_generation(pipe):
    got = generate_regions(pipe, "a red circle", [Region((0, 0, 48, 32), {"neon": 0.3, "flat": 0.7})], width=48,
                           height=32, **SMALL)
    want = plain(pipe, {"neon": 0.3, "flat": 0.7}, 48, 32)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - plain(pipe, "neon", 48, 32)).max() > 1e-3, "another style must give another image"


def test_two_regions_take_their_own_styles(pipe):
    """Left strip like the whole canvas in style A, right strip like style B; swapping swaps them."""
    a, b = plain(pipe, "neon", 64, 32), plain(pipe, "flat", 64, 32)
    for left, right, want_left, want_right in (("neon", "flat", a, b), ("flat", "neon", b, a)):
        img = generate_regions(pipe, "a red circle", [left, right], width=64, height=32, overlap=8,
                               decode="canvas", **SMALL)  # the reference images are decoded as one canvas
        lhs, rhs = img[:, :24], img[:, 40:]  # outside the 8-pixel blend band around x = 32
        own_l, other_l = np.abs(lhs - want_left[:, :24]).mean(), np.abs(lhs - want_right[:, :24]).mean()
        own_r, other_r = np.abs(rhs - want_right[:, 40:]).mean(), np.abs(rhs - want_left[:, 40:]).mean()
        assert own_l < 0.5 * other_l, (left, own_l, other_l)
        assert own_r < 0.5 * other_r, (right, own_r, other_r)


@pytest.mark.parametrize("size_ids", ["tile", "canvas"])
def test_the_hooked_unet_is_the_weighted_sum_of_its_tiles(pipe, size_ids):
    """What the stock pipeline receives is exactly sum_k w_k * UNet(tile_k, style_k); SDXL's size
    ids are each tile's own size (uncropped) or the canvas' as the pipeline gave them."""
    unet = pipe.unet
    grid = pipe.vae_scale_factor
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 32 // grid, 64 // grid)
    hidden = torch.randn(2, 16, unet.config.cross_attention_dim)
    added = None
    if unet.config.addition_embed_type == "text_time":
        ids = torch.tensor([[32.0, 64.0, 0.0, 0.0, 32.0, 64.0]]).repeat(2, 1)
        added = {"text_embeds": torch.randn(2, unet.add_embedding.linear_1.in_features - ids.shape[1] *
                                            unet.config.addition_time_embed_dim), "time_ids": ids}
    regions = panorama_regions(["neon", "flat"], 64, 32, grid)
    with torch.no_grad(), regional_styles(pipe, regions, 64, 32, overlap=16, size_ids=size_ids) as tiles:
        got = unet(sample, 10, hidden, added_cond_kwargs=added).sample
    want = torch.zeros_like(sample)
    with torch.no_grad():  # the hook is gone: the plain UNet on each crop
        for t in tiles:
            crop = sample[..., t.top:t.bottom, t.left:t.right]
            extra = added
            if added is not None and size_ids == "tile":
                h, w = crop.shape[-2] * grid, crop.shape[-1] * grid
                extra = {**added, "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(2, 1)}
            pred = unet(crop, 10, hidden, class_labels=t.style, added_cond_kwargs=extra).sample
            want[..., t.top:t.bottom, t.left:t.right] += pred * t.weight
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(tiles) == 2 and tiles[0].right > tiles[1].left, "the two tiles overlap"


def test_each_region_is_decoded_on_its_own(pipe):
    """decode="regions": without an overlap the decoded canvas is each half decoded alone, side by
    side (the decoder's group norms see one region at a time); one decode of the canvas differs."""
    grid = pipe.vae_scale_factor
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 32 // grid, 64 // grid)
    latents[..., 32 // grid:] = latents[..., 32 // grid:] * 0.2 - 1.5  # a darker right half, as neon on black
    with torch.no_grad():
        with regional_styles(pipe, ["neon", "flat"], 64, 32, overlap=0):
            got = pipe.vae.decode(latents).sample
        halves = torch.cat([pipe.vae.decode(latents[..., : 32 // grid]).sample,
                            pipe.vae.decode(latents[..., 32 // grid :]).sample], -1)
        whole = pipe.vae.decode(latents).sample
    torch.testing.assert_close(got, halves, atol=1e-5, rtol=1e-5)
    assert (got - whole).abs().max() > 1e-3, "one decode of the canvas mixes the halves' statistics"


@pytest.mark.parametrize("regions, overlap", [
    (panorama_regions(["a", "b"], 64, 32, 2), 8),
    (panorama_regions(["a", "b", "a"], 96, 32, 2), 16),
    ([Region(b, "a") for b in ((0, 0, 32, 32), (32, 0, 64, 32), (0, 32, 32, 64), (32, 32, 64, 64))], 8),
    ([Region((0, 0, 64, 64), "a"), Region((16, 16, 48, 48), "b")], 8),  # a box on a background
    ([Region((0, 0, 64, 32), "a")], 8),  # one region: weight 1 everywhere
])
@pytest.mark.parametrize("blend", sorted(BLENDS.names()))
def test_blend_weights_sum_to_one_everywhere(regions, overlap, blend):
    width, height = max(r.box[2] for r in regions), max(r.box[3] for r in regions)
    tiles = plan_tiles(regions, width, height, 2, ["a", "b"], overlap, blend)
    total = torch.zeros(height // 2, width // 2)
    for t in tiles:
        assert t.weight.min() > 0 and t.weight.max() <= 1 + 1e-6
        total[t.top:t.bottom, t.left:t.right] += t.weight
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)


def test_cosine_weights_ramp_smoothly_across_the_seam():
    """Left tile: 1, then a falling ramp over the band, no step larger than the ramp's slope;
    without an overlap the same seam is a hard 1 -> 0 step (the check can fail)."""
    regions = panorama_regions(["a", "b"], 64, 16, 2)
    left, right = plan_tiles(regions, 64, 16, 2, ["a", "b"], 16)
    row = left.weight[0]
    band = slice(16 - 4, 16 + 4)  # latent columns around the seam at x = 32 px
    assert torch.all(row[: band.start] == 1) and left.right == band.stop and right.left == band.start
    assert torch.all(row[band][1:] < row[band][:-1]), "strictly falling across the band"
    steps = torch.diff(torch.cat([row, torch.zeros(1)]))
    assert steps.abs().max() <= np.pi / (2 * 8) + 1e-6, "no jump larger than the cosine's steepest slope"
    torch.testing.assert_close(right.weight[0][:8], 1 - row[band])
    hard_left, _ = plan_tiles(regions, 64, 16, 2, ["a", "b"], 0)
    assert hard_left.right == 16 and torch.all(hard_left.weight == 1), "no overlap: a hard cut at the border"


def test_the_hook_is_removed_after_an_error(pipe):
    before = plain(pipe, "neon", 32, 32)
    with pytest.raises(RegionError, match="planned for"), regional_styles(pipe, ["neon", "flat"], 64, 32):
        plain(pipe, "neon", 32, 32)  # called at another size than planned
    assert "forward" not in pipe.unet.__dict__ and "forward" not in pipe.vae.decoder.__dict__
    np.testing.assert_array_equal(plain(pipe, "neon", 32, 32), before)


@pytest.mark.parametrize("regions, message", [
    ([Region((0, 0, 64, 32), "pixel")], r"region 0 \(0, 0, 64, 32\): unknown style 'pixel'; known styles: \['neon', 'flat'\]"),
    ([Region((0, 0, 80, 32), "neon")], r"region 0 box \(0, 0, 80, 32\) is not inside the 64x32 canvas"),
    ([Region((0, 0, 32, 32), "neon")], r"in no region \(within box \(32, 0, 64, 32\)\)"),
    ([Region((0, 0, 64, 32), {"neon": 0.5, "flat": 0.2})], "region 0 .*must sum to 1"),
    ([Region((0, 0, 33, 32), "neon"), Region((33, 0, 64, 32), "flat")], "off the latent grid"),
    ([Region((0, 0, 64, 32), ["neon", "flat"])], "one style or one mixture per region"),
])
def test_bad_layouts_are_refused_naming_the_region(pipe, regions, message):
    with pytest.raises(RegionError, match=message):
        generate_regions(pipe, "a red circle", regions, width=64, height=32, **SMALL)


def test_a_plain_pipeline_and_a_bad_overlap_are_refused(pipe, tmp_path):
    with pytest.raises(RegionError, match="multiple of"):
        generate_regions(pipe, "a red circle", ["neon", "flat"], width=64, height=32, overlap=3, **SMALL)
    stock = make_tiny_pipeline(tmp_path / "stock", arch="sd15")
    with pytest.raises(RegionError, match="need a dmm merged model"):
        generate_regions(stock, "a red circle", ["neon"], width=32, height=32, **SMALL)


def test_layout_text_reads_boxes_and_styles():
    regions = parse_layout("0,0,32,32=flat; 32,0,64,32=0.5*neon+0.5*flat", lambda s: s.upper())
    assert regions == [Region((0, 0, 32, 32), "FLAT"), Region((32, 0, 64, 32), "0.5*NEON+0.5*FLAT")]
    with pytest.raises(RegionError, match="LEFT,TOP,RIGHT,BOTTOM=STYLE"):
        parse_layout("0,0,32=flat")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return make_merged(tmp_path_factory.mktemp("regions_cli"))


def test_cli_writes_the_library_image(merged, tmp_path, capsys):
    out = tmp_path / "pano.png"
    argv = ["regions", "--model", merged, "--prompt", "a red circle", "--styles", "neon,0.5*neon+0.5*flat,flat",
            "--width", "96", "--height", "32", "--overlap", "8", "--steps", "3", "--seed", "4", "--out", out]
    assert main([str(a) for a in argv]) == 0
    assert "3 regions" in capsys.readouterr().out
    got = np.asarray(Image.open(out), dtype=np.int16)
    ref = generate_regions(load_merged(merged), "a red circle", ["neon", {"neon": 0.5, "flat": 0.5}, "flat"],
                           width=96, height=32, overlap=8, steps=3, seed=4)
    assert got.shape == (32, 96, 3) and np.abs(got - np.asarray(ref, dtype=np.int16)).max() <= 1

    layout = tmp_path / "layout.png"
    argv = ["regions", "--model", merged, "--prompt", "a red circle", "--layout", "0,0,64,32=flat;16,8,48,24=neon",
            "--width", "64", "--height", "32", "--steps", "2", "--out", layout]
    assert main([str(a) for a in argv]) == 0 and Image.open(layout).size == (64, 32)


@pytest.mark.parametrize("extra, message", [
    (["--styles", "neon,pixel"], r"unknown style 'pixel'; known styles: \['neon', 'flat'\]"),
    (["--layout", "0,0,32,32=neon"], "in no region"),
    (["--layout", "0,0,64,40=neon"], "not inside the 64x32 canvas"),
    (["--styles", "0.5*neon+0.2*flat"], "must sum to 1"),
    (["--styles", "neon", "--blend", "box"], "unknown region blend 'box'"),
    ([], "one of the arguments --styles --layout is required"),
])
def test_cli_errors_are_one_line(merged, tmp_path, capsys, extra, message):
    out = tmp_path / "x.png"
    argv = ["regions", "--model", merged, "--prompt", "a red circle", "--width", "64", "--height", "32",
            "--out", out, *extra]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(message, err), err
    assert not out.exists()


def test_cli_help_lists_the_layout_forms(capsys):
    assert main(["regions", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--styles" in text and "LEFT,TOP,RIGHT,BOTTOM=STYLE" in text
