"""Weight-merging baselines (`dmm.merge`): each method's result against a direct computation written
here, per-block weights touching only the named blocks, bad input as one clear error, outputs that
diffusers loads, and an existing output that survives a failed merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dmm.merge import MERGE_METHODS, MergeError, merge_models
from dmm.merge.cli import main
from dmm.models.arch import sd15_unet_config, sdxl_unet_config, unet_blocks
from dmm.schema import ConfigError
from dmm.testing import make_teacher, make_tiny_pipeline

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    make_tiny_pipeline(root / "base", "sdxl", seed=0)
    for i in range(3):
        make_teacher(root / "base", root / f"t{i}", seed=i + 1, scale=0.05)
    return root


def weights_of(folder) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(folder / UNET)).items()}


def merged(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / UNET if path.is_dir() else path))


def assert_all(out: dict, expected, exact: bool = True):
    """`expected(key)` in float64, rounded once to float32 like the merge."""
    assert out, "nothing merged"
    for key, value in out.items():
        want = expected(key).float()
        if exact:
            assert torch.equal(value, want), key
        else:
            torch.testing.assert_close(value, want, rtol=0, atol=1e-6, msg=key)


def test_methods_are_registered_with_descriptions_and_options():
    assert {"weighted_sum", "add_difference", "ties", "dare", "block_weights"} <= set(MERGE_METHODS.names())
    for entry in MERGE_METHODS.entries():
        assert entry.description and entry.describe().startswith(entry.name)


def test_weighted_sum_is_exactly_the_weighted_sum_and_diffusers_loads_it(world, tmp_path):
    from diffusers import DiffusionPipeline

    w = [0.1, 0.2, 0.3, 0.4]
    names = ["base", "t0", "t1", "t2"]
    out = merge_models("weighted_sum", [world / n for n in names], tmp_path / "ws", options={"weights": w})
    sds = [weights_of(world / n) for n in names]
    # sum_i w_i x_i in float64 (sd-mecha accumulates with fused multiply-adds; so does this).
    expected = lambda k: (sds[0][k] * w[0]).addcmul(sds[1][k], torch.tensor(w[1], dtype=torch.float64)) \
        .addcmul(sds[2][k], torch.tensor(w[2], dtype=torch.float64)) \
        .addcmul(sds[3][k], torch.tensor(w[3], dtype=torch.float64))
    got = merged(out)
    assert set(got) == set(sds[0])
    assert_all(got, expected)
    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    loaded = pipe.unet.state_dict()
    assert all(torch.equal(loaded[k], got[k]) for k in got)
    # The other components are the first model's.
    base = DiffusionPipeline.from_pretrained(str(world / "base"), local_files_only=True)
    key = next(iter(base.text_encoder.state_dict()))
    assert torch.equal(pipe.text_encoder.state_dict()[key], base.text_encoder.state_dict()[key])


def test_weighted_sum_refuses_bad_weights_or_normalises_on_request(world, tmp_path):
    models = [world / "t0", world / "t1"]
    with pytest.raises(MergeError, match="got 3 weights for 2 models"):
        merge_models("weighted_sum", models, tmp_path / "a", options={"weights": [0.2, 0.3, 0.5]})
    with pytest.raises(MergeError, match="sum to 2, not 1.*normalize=true"):
        merge_models("weighted_sum", models, tmp_path / "a", options={"weights": [1, 1]})
    out = merge_models("weighted_sum", models, tmp_path / "n.safetensors",
                       options={"weights": [1, 3], "normalize": True})
    a, b = weights_of(world / "t0"), weights_of(world / "t1")
    assert_all(merged(out), lambda k: (a[k] * 0.25).addcmul(b[k], torch.tensor(0.75, dtype=torch.float64)))


def test_add_difference_is_exact(world, tmp_path):
    out = merge_models("add_difference", [world / "t0", world / "t1", world / "base"], tmp_path / "ad",
                       options={"alpha": 0.7})
    a, b, c = (weights_of(world / n) for n in ("t0", "t1", "base"))
    assert_all(merged(out), lambda k: a[k].addcmul(b[k] - c[k], torch.tensor(0.7, dtype=torch.float64)))


def ties_direct(base, models, density, scale, key):
    """TIES-merging (Yadav et al. 2023) per tensor: keep the top `density` of each task vector by
    magnitude, elect the sign of the summed kept values, average the kept values agreeing with it."""
    deltas = []
    for m in models:
        d = m[key] - base[key]
        k = max(int((1 - density) * d.numel()), 1)
        threshold = d.abs().float().flatten().kthvalue(k).values  # the k-th smallest magnitude
        deltas.append(d * (d.abs() >= threshold))
    stacked = torch.stack(deltas)
    elected = torch.sign(stacked.sum(0))
    agree = torch.sign(stacked) == elected
    mean = (stacked * agree).sum(0) / agree.sum(0)
    return base[key] + scale * torch.nan_to_num(mean, nan=0.0)


def test_ties_matches_the_direct_computation(world, tmp_path):
    out = merge_models("ties", [world / f"t{i}" for i in range(3)], tmp_path / "ties", base=world / "base",
                       options={"density": 0.3, "scale": 0.8})
    base = weights_of(world / "base")
    models = [weights_of(world / f"t{i}") for i in range(3)]
    got = merged(out)
    assert_all(got, lambda k: ties_direct(base, models, 0.3, 0.8, k), exact=False)
    # Trimming matters: a plain task-vector mean is not what came out.
    key = "conv_in.weight"
    plain = (base[key] + 0.8 * sum(m[key] - base[key] for m in models) / 3).float()
    assert not torch.allclose(got[key], plain, atol=1e-4)


def test_dare_matches_the_direct_computation(world, tmp_path):
    density, seed, scale = 0.4, 7, 0.5
    out = merge_models("dare", [world / "t0", world / "t1"], tmp_path / "dare.safetensors", base=world / "base",
                       options={"density": density, "seed": seed, "scale": scale})
    base = weights_of(world / "base")
    models = [weights_of(world / "t0"), weights_of(world / "t1")]

    def direct(key):
        acc = base[key]
        for i, m in enumerate(models):
            keep = 1.0 - (1.0 - density)
            mask = np.random.default_rng(seed + i).binomial(n=1, p=keep, size=tuple(base[key].shape)).astype(bool)
            acc = acc + scale * (m[key] - base[key]) * torch.from_numpy(mask) / keep
        return acc

    got = merged(out)
    assert_all(got, direct, exact=False)
    kept = (got["conv_in.weight"] != base["conv_in.weight"].float()).double().mean().item()
    assert 0.4 < kept < 0.9  # two masks of density 0.4: about 1 - 0.6**2 = 0.64 of entries touched


def test_block_weights_touch_exactly_the_named_blocks(world, tmp_path):
    out = merge_models("block_weights", [world / "t0", world / "t1"], tmp_path / "bw",
                       options={"alpha": 0.0, "blocks": {"mid_block": 1.0, "down_blocks.1": 0.25}})
    a, b = weights_of(world / "t0"), weights_of(world / "t1")
    share = {"mid_block": 1.0, "down_blocks.1": 0.25}

    def expected(key):
        block = next((n for n in share if key.startswith(n + ".")), None)
        return torch.lerp(a[key], b[key], torch.tensor(share.get(block, 0.0), dtype=torch.float64))

    got = merged(out)
    assert_all(got, expected)
    assert torch.equal(got["mid_block.resnets.0.conv1.weight"], b["mid_block.resnets.0.conv1.weight"].float())
    assert torch.equal(got["up_blocks.0.resnets.0.conv1.weight"], a["up_blocks.0.resnets.0.conv1.weight"].float())
    with pytest.raises(ConfigError, match=r"unknown block 'middle'.*'mid_block'"):
        merge_models("block_weights", [world / "t0", world / "t1"], tmp_path / "x", options={"blocks": {"middle": 1}})


@pytest.mark.parametrize("config", [sd15_unet_config(), sdxl_unet_config()], ids=["sd15", "sdxl"])
def test_block_table_of_full_size_unets_covers_every_key(config):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from dmm.merge.methods import block_of

    blocks = unet_blocks(config)
    assert blocks.count("mid_block") == 1 and len([b for b in blocks if b.startswith("down_blocks")]) == \
        len(config["down_block_types"])
    with init_empty_weights():
        keys = UNet2DConditionModel(**config).state_dict().keys()
    assert all(block_of(k, blocks) is not None for k in keys)
    assert ("add_embedding" in blocks) == (config.get("addition_embed_type") == "text_time")


def test_models_of_different_shapes_name_the_key_and_both_shapes(world, tmp_path):
    from diffusers import UNet2DConditionModel

    from dmm.testing import tiny_unet_config

    other = dict(tiny_unet_config("sdxl"), block_out_channels=(8, 32))
    UNet2DConditionModel(**other).save_pretrained(str(tmp_path / "other"))
    shapes = r"key 'add_embedding.linear_1.bias' has shape \[64\] in .*t0 but \[32\] in .*other"
    with pytest.raises(MergeError, match=shapes):
        merge_models("weighted_sum", [world / "t0", tmp_path / "other"], tmp_path / "o")


def test_cli_merges_and_reports_bad_input_in_one_line(world, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["--method", "weighted_sum", "--models", str(world / "t0"), str(world / "t1"),
                 "--weights", "0.5", "0.5", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["--method", "averge", "--models", str(world / "t0"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "unknown merge method 'averge'" in err and "weighted_sum" in err and "dare" in err
    assert main(["--method", "weighted_sum", "--models", str(world / "t0"), str(world / "t1"),
                 "--weights", "1", "--out", str(tmp_path / "y")]) == 2
    assert "got 1 weights for 2 models" in capsys.readouterr().err
    assert main(["--method", "ties", "--models", str(world / "t0"), "--out", str(tmp_path / "y")]) == 2
    assert "give --base" in capsys.readouterr().err


def test_a_failed_merge_leaves_an_existing_output_untouched(world, tmp_path, monkeypatch):
    from dmm import merge

    out = merge_models("weighted_sum", [world / "t0", world / "t1"], tmp_path / "keep")
    before = merged(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(merge, "atomic_save_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        merge_models("weighted_sum", [world / "t1", world / "t2"], tmp_path / "keep")
    after = merged(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_single_files_in_any_layout_merge_in_their_dtype_and_keep_integer_buffers(tmp_path):
    """Original-layout single files (here fp16, with a text-encoder part and integer position ids)
    merge key by key into a file of the same layout; integer buffers are the first model's."""
    from dmm.io import atomic_save_safetensors

    files, sds = [], []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g).half(),
              "model.diffusion_model.out.2.bias": torch.randn(4, generator=g).half(),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(16) + i}
        atomic_save_safetensors(sd, tmp_path / f"m{i}.safetensors")
        files.append(tmp_path / f"m{i}.safetensors")
        sds.append(sd)
    out = merge_models("weighted_sum", files, tmp_path / "merged.safetensors", options={"weights": [0.3, 0.7]})
    got = load_file(str(out))
    assert set(got) == set(sds[0])
    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert torch.equal(got[ids], sds[0][ids])
    for key in sds[0]:
        if key != ids:
            want = (sds[0][key].double() * 0.3).addcmul(sds[1][key].double(), torch.tensor(0.7, dtype=torch.float64))
            assert got[key].dtype == torch.float16 and torch.equal(got[key], want.half()), key
    with pytest.raises(MergeError, match="needs the UNet's config.json"):
        merge_models("block_weights", files, tmp_path / "b.safetensors")
    with pytest.raises(MergeError, match="a diffusers folder needs a UNet config"):
        merge_models("weighted_sum", files, tmp_path / "folder")


def test_cli_says_which_method_takes_weights(world, tmp_path, capsys):
    assert main(["--method", "ties", "--base", str(world / "base"), "--models", str(world / "t0"),
                 "--weights", "1", "--out", str(tmp_path / "y")]) == 2
    assert "--weights is for weighted_sum; ties takes --option" in capsys.readouterr().err


def test_merge_verb_plugs_into_a_verb_parser(world, tmp_path, capsys):
    """The shape `dmm.cli` expects of a verb: `arguments(subparser)`, then `run(args)` -> status."""
    import argparse

    from dmm.merge.cli import MergeVerb

    parser = argparse.ArgumentParser(prog="dmm")
    MergeVerb.arguments(parser.add_subparsers(dest="verb").add_parser("merge"))
    args = parser.parse_args(["merge", "--method", "add_difference", "--models", str(world / "t0"),
                              str(world / "t1"), str(world / "base"), "--option", "alpha=0.5",
                              "--out", str(tmp_path / "v.safetensors")])
    assert MergeVerb.run(args) == 0 and (tmp_path / "v.safetensors").is_file()
    args.method = "nope"
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        MergeVerb.run(args)


def test_nan_in_an_input_is_named_and_nothing_is_written(world, tmp_path):
    from dmm.io import atomic_save_safetensors

    sd = load_file(str(world / "t1" / UNET))
    sd["mid_block.resnets.0.conv1.bias"][3] = float("nan")
    atomic_save_safetensors(sd, tmp_path / "bad.safetensors")
    good = tmp_path / "good.safetensors"
    atomic_save_safetensors(load_file(str(world / "t0" / UNET)), good)
    with pytest.raises(MergeError, match=r"'mid_block.resnets.0.conv1.bias' is not finite: NaN/inf in .*bad"):
        merge_models("weighted_sum", [good, tmp_path / "bad.safetensors"], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
