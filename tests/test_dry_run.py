"""The dry run (`launchers/train.py --dry-run`): every shipped recipe plans without reading a
weight, ZeRO/FSDP sharding and the teacher layout show in the per-rank bytes, the estimate of a
small real run is within 20% of its measured peak, and a bad --gpu-memory is refused clearly."""

from __future__ import annotations

import builtins
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmm.recipes import load_recipe
from dmm.train.dryrun import (
    Activations,
    DryRunError,
    memory_parts,
    parse_memory,
    plan,
    render,
    supervisor_slots,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
GiB = 2**30


def _launcher():
    spec = importlib.util.spec_from_file_location("dmm_train_launcher", ROOT / "launchers" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read a weight file fails the test (Python opens, safetensors, torch.load)."""
    import safetensors
    import safetensors.torch

    opened: list[str] = []
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file).endswith((".safetensors", ".bin", ".ckpt", ".pt", ".pth")):
            opened.append(str(file))
            raise AssertionError(f"the dry run opened a weight file: {file}")
        return real_open(file, *args, **kwargs)

    def refuse(*args, **kwargs):
        opened.append(str(args[:1]))
        raise AssertionError(f"the dry run read weights: {args[:1]}")

    monkeypatch.setattr(builtins, "open", guarded_open)
    for module, name in ((safetensors, "safe_open"), (safetensors.torch, "load_file"),
                         (safetensors.torch, "safe_open"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    yield opened
    assert not opened, f"weights were read: {opened}"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_dry_runs_without_reading_weights(recipe, no_weights, tmp_path):
    r = load_recipe(recipe, [f"train.output_dir={tmp_path}/run"])
    gpus = 1 if r.distributed.engine == "none" else len(supervisor_slots(r))  # the incremental's extra slot too
    p = plan(r, gpus, parse_memory("80GiB"))
    text = render(p)
    assert "FITS" in text or "DOES NOT FIT" in text
    assert len(p.ranks) >= 1 and all(rp.peak > rp.resident_bytes > 0 for rp in p.ranks)
    if not Path(r.model.base).is_dir():  # the placeholder paths of the real-model recipes
        assert "standard" in p.models.source and "not on disk" in p.models.source
    for name in memory_parts(r)["target_networks"]:  # SPLAM's: a whole fp32 student on every rank
        assert all(_row(p, k, name) == 4 * p.models.student for k in range(gpus)) and "target forward" in text


def test_sdxl_4_on_4_8_16_gpus(no_weights):
    """ZeRO-2 divides the optimizer state (and fp32 master weights) by the world size; each rank
    holds one teacher (4 teachers, world a multiple of 4); the student is the real 2.57B UNet."""
    r = load_recipe(ROOT / "recipes" / "sdxl_4.yaml")
    plans = {g: plan(r, g, parse_memory("80GiB")) for g in (4, 8, 16)}
    p4 = plans[4]
    assert 2.56e9 < p4.models.student < 2.58e9 and p4.models.teacher == p4.models.student - 4 * 1280 - 2 * 1280**2 - 2 * 1280
    for g, p in plans.items():
        assert sum(len(rp.ranks) for rp in p.ranks) == g
        assert len(p.ranks) == 1 and all(len(names) == 1 for names in p.ranks[0].teachers.values())
        assert [p.ranks[0].teachers[k][0] for k in range(4)] == r.style_names
        states = dict(p.ranks[0].resident)["student AdamW states (fp32 exp_avg, exp_avg_sq)"]
        assert states == 8 * p.models.student // g
    assert plans[4].peak > plans[8].peak > plans[16].peak
    out = render(plans[16])
    assert "ranks 0..15" in out and "ZeRO-2" in out


def test_sharding_and_offload_move_bytes(no_weights):
    r = load_recipe(ROOT / "recipes" / "sdxl_4.yaml")
    budget = parse_memory("80GiB")
    ranks = {}
    for stage in (1, 2, 3):
        r.distributed.options = {"zero_stage": stage}
        ranks[stage] = plan(r, 8, budget).ranks[0]
    # ZeRO-2 shards the gradients (held from backward to the step), ZeRO-3 also the weights
    assert ranks[1].resident_bytes == ranks[2].resident_bytes > ranks[3].resident_bytes
    assert ranks[1].phases["optimizer step"] > ranks[2].phases["optimizer step"]
    r.distributed.options = {"zero_stage": 2, "offload_optimizer": True}
    off = plan(r, 8, budget).ranks[0]
    assert off.resident_bytes < ranks[2].resident_bytes and off.host > 0
    r.distributed.engine, r.distributed.options = "fsdp2", {}
    fsdp = plan(r, 8, budget).ranks[0]
    assert dict(fsdp.resident)["student weights (fp32 shards, bf16 compute)"] == 4 * plan(r, 8, budget).models.student // 8


def test_a_recipe_that_does_not_fit_names_switches_that_do(no_weights):
    r = load_recipe(ROOT / "recipes" / "sdxl_4.yaml", ["train.gradient_checkpointing=false"])
    p = plan(r, 4, parse_memory("40GiB"))
    assert not p.fits
    out = render(p)
    assert "DOES NOT FIT" in out
    suggested = [line.split("(peak")[0].strip() for line in out.splitlines() if line.startswith("  --set")]
    assert suggested, out
    for flags in suggested:  # each suggestion, applied, fits
        sets = [s for s in flags.split("--set ") if s.strip()]
        q = plan(load_recipe(ROOT / "recipes" / "sdxl_4.yaml", ["train.gradient_checkpointing=false"]
                             + [s.strip() for s in sets]), 4, parse_memory("40GiB"))
        assert q.fits, flags


def test_launcher_flag_prints_the_table_and_refuses_a_bad_unit(capsys):
    main = _launcher().main
    code = main(["--recipe", str(ROOT / "recipes" / "sdxl_4.yaml"), "--dry-run", "--gpus", "8",
                 "--gpu-memory", "80GiB"])
    out = capsys.readouterr().out
    assert code in (0, 1) and "ranks 0..7 (8)" in out and "teachers by rank: 0: juggernaut_xl_v10" in out
    assert main(["--recipe", str(ROOT / "recipes" / "sdxl_4.yaml"), "--dry-run", "--gpu-memory", "80XB"]) == 2
    err = capsys.readouterr().err
    assert "unknown unit 'XB'" in err and "80GiB" in err
    assert main(["--recipe", str(ROOT / "recipes" / "sdxl_4.yaml"), "--dry-run", "--gpu-memory", "80"]) == 2
    assert "has no unit" in capsys.readouterr().err
    assert main(["--recipe", str(ROOT / "recipes" / "sdxl_4.yaml"), "--dry-run", "--gpus", "3"]) == 2
    assert "grad_accum_steps" in capsys.readouterr().err  # 4 teachers cannot share 3 ranks equally


# Layout tests: the activation figures do not matter (and a toy UNet's would be measured now).
FLAT = Activations(student=1, student_other=None, disc=1, disc_frozen=1, teacher=1, vae=1, features=1, source="test")
PREVIOUS = "previous student"


def _holding(p, name: str) -> list[int]:
    return sorted(rank for rp in p.ranks for rank, names in rp.teachers.items() if name in names)


def _row(p, rank: int, prefix: str) -> int:
    rp = next(rp for rp in p.ranks if rank in rp.ranks)
    return sum(b for label, b in rp.resident if label.startswith(prefix))


@pytest.mark.parametrize("regularizer", [True, False])
def test_incremental_regulariser_takes_a_slot_of_its_own(no_weights, regularizer):
    """sd15_incremental_4p4: 4 new teachers + the frozen previous student = 5 slots; on 10 ranks,
    ranks 4 and 9 hold the previous student (sized like the UNet: its init_from folder is a
    placeholder here), the others one teacher; without the regulariser no rank holds it."""
    r = load_recipe(ROOT / "recipes" / "sd15_incremental_4p4.yaml")
    r.objective.options = {"regularizer": regularizer}
    gpus = 10 if regularizer else 8
    p = plan(r, gpus, parse_memory("80GiB"), act=FLAT)
    assert sum(len(rp.ranks) for rp in p.ranks) == gpus
    if not regularizer:
        assert not p.models.extra and _holding(p, PREVIOUS) == [] and "previous student" not in render(p)
        assert all(_row(p, k, "teachers x1") == 2 * p.models.teacher for k in range(gpus))
        return
    assert p.models.slots == [*r.style_names, PREVIOUS]
    assert _holding(p, PREVIOUS) == [4, 9]
    assert "init_from" in p.models.source and "not a merged model on disk" in p.models.source
    assert abs(p.models.extra[PREVIOUS] - p.models.student) < 1e-3 * p.models.student  # a full style UNet
    for k in range(gpus):
        regulariser = _row(p, k, PREVIOUS)
        assert regulariser == (2 * p.models.extra[PREVIOUS] if k in (4, 9) else 0)  # bfloat16
        assert _row(p, k, "teachers x") == (0 if k in (4, 9) else 2 * p.models.teacher)
    out = render(p)
    assert "9: previous student" in out and "supervisors held per rank" in out
    assert "supervisor layout: 5 supervisors (4 teachers, previous student) on 10 ranks" in out
    # Layouts are sized over the 5 slots: 4 ranks cannot share them equally.
    with pytest.raises(DryRunError, match="5 teachers"):
        plan(r, 4, parse_memory("80GiB"), act=FLAT)


def _merged_folder(folder: Path, base: Path, styles: list[str]) -> Path:
    """A merged model's configs on disk (no weights): what the dry run reads of model.init_from."""
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text((base / "model_index.json").read_text())
    cfg = json.loads((base / "unet" / "config.json").read_text())
    cfg.update(_class_name="StyleUNet2DConditionModel", style_names=styles)
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("regularizer", [True, False])
def test_toy_incremental_regulariser_from_the_merged_config(no_weights, tmp_path, regularizer):
    """toy_incremental_4p2 on 3 ranks (2 new teachers + the previous student): its config is read
    from model.init_from (4 old styles), the student has 6 style rows, rank 2 holds the copy."""
    r = load_recipe(ROOT / "recipes" / "toy_incremental_4p2.yaml")
    old = ["flat", "outline", "neon", "pixel"]
    r.model.init_from = str(_merged_folder(tmp_path / "merged", Path(r.model.base), old))
    r.objective.options = {"regularizer": regularizer}
    r.distributed.engine = "fsdp2"
    p = plan(r, 3 if regularizer else 2, parse_memory("80GiB"), act=FLAT)
    time_embed = json.loads((Path(r.model.base) / "unet" / "config.json").read_text())["block_out_channels"][0] * 4
    if not regularizer:
        assert _holding(p, PREVIOUS) == [] and not p.models.extra
        assert [p.ranks[0].teachers[k] for k in range(2)] == [["hatched"], ["sepia"]]
        return
    assert _holding(p, PREVIOUS) == [2] and str(tmp_path / "merged") in p.models.source
    assert p.models.student - p.models.extra[PREVIOUS] == 2 * time_embed  # 6 style rows against 4
    assert _row(p, 2, PREVIOUS) == 4 * p.models.extra[PREVIOUS] and _row(p, 2, "teachers x") == 0  # float32
    assert _row(p, 0, PREVIOUS) == 0 and _row(p, 0, "teachers x1") == 4 * p.models.teacher
    assert "2: previous student" in render(p)


@pytest.mark.parametrize("name, gpus", [("sd15_splam", 8), ("sdxl_splam", 4), ("sdxl_splam", 8)])
def test_splam_holds_its_target_on_every_rank_and_no_discriminator(no_weights, name, gpus):
    """SPLAM trains the student alone (loss.lambda_adv is in the recipe but does not apply), feeds it
    a timestep_cond (a 256 -> 320 Linear more than a dmm student), keeps a whole fp32 target on
    every rank, forwarded without grad while the student's activations wait for backward."""
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert r.loss.lambda_adv > 0 and r.optim.ema_decay == 0
    p = plan(r, gpus, parse_memory("80GiB"))
    m = p.models
    # the style codebook and its MLP (as a dmm student), and the timestep_cond projection
    assert m.student - m.teacher == len(r.style_names) * 1280 + 2 * 1280**2 + 2 * 1280 + 256 * 320
    assert len(p.ranks) == 1 and sum(len(rp.ranks) for rp in p.ranks) == gpus
    rp = p.ranks[0]
    labels = [label for label, _ in rp.resident]
    assert not any("discriminator" in label for label in labels), labels
    assert _row(p, gpus - 1, "splam_target") == 4 * m.student
    assert "discriminator update" not in rp.phases and p.act.features == 0 and p.act.target > 0
    b = r.data.batch_size
    assert rp.phases["target forward"] == rp.phases["student forward/backward"] + b * p.act.target
    assert rp.phases["weight-average update"] == 0  # ZeRO-2: the bf16 weights are whole on every rank
    out = render(p)
    assert "not trained: objective splam has none" in out and "x2 per step" in out
    assert "splam_target (target network" in out and "discriminator update" not in out


def test_ema_decay_keeps_an_average_on_the_main_rank_only(no_weights):
    r = load_recipe(ROOT / "recipes" / "sdxl_4.yaml", ["optim.ema_decay=0.999"])
    p = plan(r, 8, parse_memory("80GiB"), act=FLAT)
    plain = plan(load_recipe(ROOT / "recipes" / "sdxl_4.yaml"), 8, parse_memory("80GiB"), act=FLAT)
    assert [rp.ranks for rp in p.ranks] == [[0], list(range(1, 8))]
    average = 4 * p.models.student
    assert _row(p, 0, "student weight average") == average
    assert all(_row(p, k, "student weight average") == 0 for k in range(1, 8))
    assert p.ranks[0].resident_bytes == plain.ranks[0].resident_bytes + average
    assert p.ranks[1].resident_bytes == plain.ranks[0].resident_bytes
    assert "rank 0" in render(p) and "main rank only" in render(p)
    # Sharded weights: every rank gathers the student for the update, one parameter at a time (the
    # trainer's keeps_ema): the transient is the largest parameter, far below the whole student.
    r.distributed.engine, r.distributed.options = "fsdp2", {}
    q = plan(r, 8, parse_memory("80GiB"), act=FLAT)
    assert 0 < q.models.largest_param < q.models.student // 50
    assert all(rp.phases["weight-average update"] == 4 * q.models.largest_param for rp in q.ranks)


def test_lambda_adv_0_drops_the_discriminator(no_weights):
    p = plan(load_recipe(ROOT / "recipes" / "sdxl_4.yaml", ["loss.lambda_adv=0"]), 4, parse_memory("80GiB"), act=FLAT)
    with_disc = plan(load_recipe(ROOT / "recipes" / "sdxl_4.yaml"), 4, parse_memory("80GiB"), act=FLAT)
    assert not any("discriminator" in label for label, _ in p.ranks[0].resident)
    assert "discriminator update" not in p.ranks[0].phases and "discriminator update" in with_disc.ranks[0].phases
    assert p.peak < with_disc.peak
    assert "(not trained: loss.lambda_adv is 0)" in render(p)


def test_mix_share_keeps_the_partners_features_too(no_weights):
    r = load_recipe(ROOT / "recipes" / "sd15_8.yaml", ["loss.mix_share=0.5"])
    assert memory_parts(r)["teacher_features"] == 2
    act = Activations(student=1, student_other=None, disc=1, disc_frozen=1, teacher=1, vae=1, features=1000,
                      source="test")
    mixed, single = (plan(x, 8, parse_memory("80GiB"), act=act).ranks[0]
                     for x in (r, load_recipe(ROOT / "recipes" / "sd15_8.yaml")))
    b = r.data.batch_size
    assert mixed.phases["student forward/backward"] - single.phases["student forward/backward"] == 1000 * b


def test_uncond_weight_doubles_the_students_rows_and_calls_each_teacher_twice(no_weights):
    r = load_recipe(ROOT / "recipes" / "sd15_8.yaml", ["loss.uncond_weight=1"])
    assert memory_parts(r)["student_rows"] == 2 and memory_parts(r)["teacher_calls"] == 2
    act = Activations(student=1000, student_other=None, disc=1, disc_frozen=1, teacher=1, vae=1, features=1,
                      source="test")
    both, single = (plan(x, 8, parse_memory("80GiB"), act=act)
                    for x in (r, load_recipe(ROOT / "recipes" / "sd15_8.yaml")))
    b = r.data.batch_size
    key = "student forward/backward"
    assert both.ranks[0].phases[key] - single.ranks[0].phases[key] == 1000 * b
    assert "x2 (rows per sample in its forward)" in render(both) and "x2 (rows" not in render(single)


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * GiB), ("80 GB", 80 * 10**9), ("40960MiB", 40 * GiB),
                                            ("1.5TiB", int(1.5 * 2**40))])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80XB", "eighty", "80", "-1GiB", "0GiB"])
def test_parse_memory_refuses(text):
    with pytest.raises(DryRunError, match="--gpu-memory"):
        parse_memory(text)


def test_block_output_shapes_match_the_unet(tiny_unet):
    from dmm.models.arch import block_output_shapes
    from dmm.models.features import BlockFeatures
    from tests.conftest import unet_inputs

    x, t, ehs, kwargs = unet_inputs(tiny_unet)
    with torch.no_grad(), BlockFeatures(tiny_unet, detach=True) as rec:
        tiny_unet(x, t, ehs, **kwargs)
    got = {k: tuple(v.shape[1:]) for k, v in rec.outputs.items()}
    assert got == block_output_shapes(tiny_unet.config, x.shape[-1])


@pytest.mark.slow
def test_estimate_of_a_small_real_run_is_within_20_percent(tmp_path):
    """A real run (engine none, 2 teachers, a 20M-parameter SDXL-shaped UNet so that model memory,
    not the interpreter, dominates): the dry run's estimate against the measured peak rise of the
    resident set of a fresh process that builds the trainer and runs 2 steps."""
    import yaml
    from diffusers import UNet2DConditionModel

    from dmm.models.arch import unet_config
    from dmm.testing import build_tiny_world, tiny_recipe_dict

    world = build_tiny_world(tmp_path / "world", arch="sdxl", teachers=2, n_samples=16)
    cfg = unet_config("sdxl", block_out_channels=(96, 192, 192), layers_per_block=2, attention_head_dim=8,
                      norm_num_groups=32, text_dim=32, sample_size=8)
    for seed, folder in enumerate([world.base, *world.teachers.values()]):
        torch.manual_seed(seed)
        UNet2DConditionModel(**cfg).save_pretrained(str(folder / "unet"))
    raw = tiny_recipe_dict(world, tmp_path / "run", data={"batch_size": 8})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dry_run_check.py"), "--recipe", str(recipe),
                           "--steps", "2"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["measured"] > 200 * 2**20, result  # the models dominate what is measured
    assert 0.8 <= result["ratio"] <= 1.2, proc.stdout
