"""Precomputed inputs: the command writes what training would compute, resumes, refuses a foreign
folder, and the latent stream visits the samples exactly as the image stream does."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_tensors

from dmm.conditioning import FrozenPipeline
from dmm.data import ShardStream
from dmm.data.latents import LatentStream, PrecomputedError, check_manifest
from dmm.data.precompute import main, precompute
from dmm.data.webdata import prepare_image
from dmm.recipes import parse_recipe
from dmm.testing import build_tiny_world, tiny_recipe_dict
from tests.teacher_reference import perturb_text_encoders


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """SDXL-shaped tiny world; teacher b brings its own (perturbed) text encoders."""
    w = build_tiny_world(tmp_path_factory.mktemp("pre") / "w", "sdxl", teachers=("a", "b"), n_samples=32, per_shard=8)
    perturb_text_encoders(w.teachers["b"], seed=7)
    return w


@pytest.fixture(scope="module")
def made(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("made") / "latents"
    recipe = parse_recipe(tiny_recipe_dict(world, out.parent / "run"))
    manifest = precompute(recipe, out, chunk=5, progress=False)
    return recipe, out, manifest


def read_samples(path):
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({n.rsplit(".", 1)[0] for n in members})
    return {k: (load_tensors(members[k + ".safetensors"]), json.loads(members[k + ".json"])) for k in keys}


def test_manifest_and_tensors_equal_what_training_computes(world, made):
    recipe, out, manifest = made
    assert manifest["complete"] and manifest["samples"] == 32 and len(manifest["shards"]) == len(world.shards)
    assert sorted(manifest["own_text_encoders"]) == ["1"]  # teacher b only
    assert manifest["resolution"] == 16 and manifest["base"]["path"] == str(world.base)
    assert json.loads((out / "manifest.json").read_text()) == manifest

    # Shard 0 through the training objects, chunked as training batches would be (>= 2 images).
    base = FrozenPipeline(world.base, resolution=16)
    teacher_b = base.captions.with_encoders(*_own_encoders(world))
    raw = list(ShardStream([str(world.shards[0])], batch_size=1, resolution=16, shuffle_buffer=0)._raw_samples(0))
    decoded = [prepare_image(Image.open(io.BytesIO(s["png"])), 16) for s in raw]
    captions = [s["txt"].decode() for s in raw]
    latents = base.encode_images(torch.stack([d[0] for d in decoded[:4]]))
    stored = read_samples(out / "shard-00000.tar")
    assert list(stored) == [s["__key__"] for s in raw]  # same keys, same order
    for j, sample in enumerate(raw[:4]):
        tensors, meta = stored[sample["__key__"]]
        assert meta["caption"] == captions[j]
        assert torch.equal(tensors["latents"], latents[j])
        assert tensors["size_ids"].tolist() == [16, 16, 0, 0, 16, 16]
        cond = base.encode_captions([captions[j]])
        assert torch.equal(tensors["base.hidden"], cond.encoder_hidden_states[0])
        assert torch.equal(tensors["base.pooled"], cond.added_cond_kwargs["text_embeds"][0])
        own = teacher_b.encode([captions[j]])
        assert torch.equal(tensors["teacher1.hidden"], own.encoder_hidden_states[0])
        assert not torch.equal(tensors["teacher1.hidden"], tensors["base.hidden"])
        assert "teacher0.hidden" not in tensors  # teacher a uses the base's encoders


def _own_encoders(world):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = world.teachers["b"]
    return (CLIPTextModel.from_pretrained(str(folder / "text_encoder")),
            CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2")))


def test_latent_stream_visits_samples_as_the_image_stream(world, made):
    recipe, out, manifest = made
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    kwargs = dict(batch_size=4, resolution=16, seed=3, rank=1, world_size=2, shuffle_buffer=8)
    images, latents = iter(ShardStream([str(s) for s in world.shards], **kwargs)), iter(LatentStream(urls, **kwargs))
    for _ in range(12):  # past two epoch boundaries (16 samples per rank)
        a, b = next(images), next(latents)
        assert a["captions"] == b["captions"] and torch.equal(a["size_ids"], b["size_ids"])
    stream = LatentStream(urls, **kwargs)
    batch = next(iter(stream))
    cond = stream.conditioning(batch, "base", ["" if j == 1 else c for j, c in enumerate(batch["captions"])])
    assert torch.equal(cond.encoder_hidden_states[1], stream.empty["base.hidden"])
    assert torch.equal(cond.encoder_hidden_states[0], batch["base.hidden"][0])
    assert cond.added_cond_kwargs["time_ids"].dtype == torch.float32


@pytest.mark.slow
def test_resume_keeps_finished_shards_and_redoes_a_half_written_one(world, made, tmp_path):
    recipe, out, _ = made
    copy = tmp_path / "latents"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    kept = copy / "shard-00001.tar"
    stamp = kept.stat().st_mtime_ns
    (copy / "shard-00002.tar").unlink()
    (copy / ".shard-00002.tar.abc.tmp").write_bytes(b"half")  # a crash mid-write leaves only this
    manifest = json.loads((copy / "manifest.json").read_text())
    atomic = {**manifest, "complete": False}
    (copy / "manifest.json").write_text(json.dumps(atomic))
    with pytest.raises(PrecomputedError, match="not finished"):
        check_manifest(copy, recipe, [1])
    again = precompute(recipe, copy, chunk=5, progress=False)
    assert again == manifest
    assert kept.stat().st_mtime_ns == stamp
    assert (copy / "shard-00002.tar").read_bytes() == (out / "shard-00002.tar").read_bytes()
    assert not list(copy.glob(".*.tmp"))


@pytest.mark.slow
def test_two_ranks_write_disjoint_shards(world, made, tmp_path):
    recipe, out, manifest = made
    split = tmp_path / "split"
    # Without a process group each call is one rank; rank 0 goes last: it writes the manifest.
    assert precompute(recipe, split, chunk=5, rank=1, world_size=2, progress=False) is None
    assert sorted(p.name for p in split.glob("shard-*.tar")) == ["shard-00001.tar", "shard-00003.tar"]
    assert precompute(recipe, split, chunk=5, rank=0, world_size=2, progress=False) == manifest
    for s in manifest["shards"]:
        assert (split / s["name"]).read_bytes() == (out / s["name"]).read_bytes()


def test_a_folder_made_for_another_recipe_is_refused(world, made, capsys):
    recipe, out, _ = made
    other = parse_recipe(tiny_recipe_dict(world, out.parent / "run", data={"resolution": 32}))
    with pytest.raises(PrecomputedError, match=r"manifest field resolution is 16, the recipe gives 32"):
        check_manifest(out, other, [1])
    with pytest.raises(PrecomputedError, match=r"own_text_encoders"):
        check_manifest(out, recipe, [])  # the teacher pool says no teacher brings its own encoders
    # The command refuses to resume into it (nothing written), with one line and exit 2.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    path = out.parent / "other.yaml"
    import yaml

    path.write_text(yaml.safe_dump(tiny_recipe_dict(world, out.parent / "run", data={"resolution": 32})))
    assert main(["--recipe", str(path), "--out", str(out)]) == 2
    assert "manifest field resolution is 16, the recipe gives 32" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert check_manifest(out, recipe, [1])["samples"] == 32
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


@pytest.mark.slow
def test_training_from_precomputed_inputs_equals_training_from_images(world, made, tmp_path):
    """Same shards, seeds and steps: identical losses and student weights, bitwise; no VAE or text
    encoder loaded (caption dropout high enough that some captions drop, all three losses on)."""
    from dmm.train.trainer import DistillationTrainer

    _, out, _ = made
    sections = dict(data={"caption_dropout": 0.5, "shuffle_buffer": 8}, loss={"lambda_feat": 0.01, "lambda_adv": 0.1})
    runs = {}
    for name, extra in (("images", {}), ("latents", {"precomputed": str(out)})):
        raw = tiny_recipe_dict(world, tmp_path / name, **sections)
        raw["data"].update(extra)
        trainer = DistillationTrainer(parse_recipe(raw))
        data = iter(trainer.stream)
        metrics = [trainer.train_step(next(data)) for _ in range(3)]
        runs[name] = (trainer, metrics)
    (a, ma), (b, mb) = runs["images"], runs["latents"]
    assert b.base.pipe.vae is None and b.base.pipe.text_encoder is None and b.base.pipe.text_encoder_2 is None
    assert b.teacher_captions == {} and all(t.text_encoder is None for t in b.teachers.values())
    assert sorted(a.teacher_captions) == [1]
    assert ma == mb
    sa, sb = a.student_state_dict(), b.student_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # Sample grids still work: prompts from the latent shards, VAE and text encoders loaded for them only.
    from dmm.train.tblog import first_captions

    assert first_captions(b.stream, 2) == first_captions(a.stream, 2)
    grid = b._grid_pipe()
    assert grid.vae is not None and grid.text_encoder is not None and grid.unet is None
