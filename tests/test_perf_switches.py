"""Each `perf:` switch changes speed, not results: a few steps with it equal a few steps without,
within float tolerance (exactly, where the arithmetic is the same)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dmm.train.trainer import DistillationTrainer, TrainingDiverged
from tests import tiny_world

STEPS = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world.build(tmp_path_factory.mktemp("perf"))


def run_steps(world, out, **perf):
    recipe = tiny_world.recipe(world, out, perf=perf, train={"max_steps": STEPS})
    trainer = DistillationTrainer(recipe)
    batches = list(itertools.islice(iter(trainer.stream), STEPS))
    metrics = [{k: float(v) for k, v in trainer.train_step(b).items()} for b in batches]
    return trainer, metrics, {k: v.detach().clone() for k, v in trainer.models["student"].state_dict().items()}


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    _, metrics, state = run_steps(world, tmp_path_factory.mktemp("ref") / "run")
    return metrics, state


def close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0.0 if atol == 0 else 1e-3,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("perf, atol", [
    ({"host_sync": "log"}, 0.0),           # same arithmetic: the weights are bitwise equal
    ({"device_rng": "on"}, 0.0),           # on the CPU the device generator is the CPU generator
    # Adam normalises each update, so float-level differences in tiny gradients move a weight by up
    # to a fraction of lr (1e-3 here): compare the weights to a tenth of one step.
    ({"fused_adamw": "on"}, 1e-4),
    ({"attention": "classic"}, 1e-4),
    ({"channels_last": True}, 1e-4),
])
def test_switch_keeps_results(world, tmp_path, reference, perf, atol):
    ref_metrics, ref_state = reference
    trainer, metrics, state = run_steps(world, tmp_path / "run", **perf)
    close(state, ref_state, atol)
    for got, want in zip(metrics, ref_metrics):
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    if "fused_adamw" in perf:
        assert all(o.defaults["fused"] for o in trainer.engine.optimizers.values())


@pytest.mark.slow
def test_compiled_blocks_keep_results(world, tmp_path, reference):
    _, ref_state = reference
    trainer, _, state = run_steps(world, tmp_path / "run", compile="blocks", compile_backend="aot_eager")
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in trainer.models["student"].down_blocks)
    close(state, ref_state, 1e-4)


def test_log_host_sync_keeps_tensors_on_the_device_until_a_log_step(world, tmp_path):
    recipe = tiny_world.recipe(world, tmp_path / "run", perf={"host_sync": "log"})
    trainer = DistillationTrainer(recipe)
    metrics = trainer.train_step(next(iter(trainer.stream)))
    assert all(isinstance(v, torch.Tensor) for k, v in metrics.items()), metrics


@pytest.mark.parametrize("host_sync, fails_at", [("step", 1), ("log", 2)])
def test_nan_is_caught_under_either_host_sync(world, tmp_path, host_sync, fails_at):
    recipe = tiny_world.recipe(world, tmp_path / "run", perf={"host_sync": host_sync},
                               train={"max_steps": 4, "log_every": 2, "checkpoint_every": 4},
                               log={"samples": False})
    trainer = DistillationTrainer(recipe)
    for teacher in trainer.teachers.values():
        with torch.no_grad():
            next(teacher.unet.parameters()).fill_(float("nan"))
    done = []
    step = trainer.train_step

    def counted(batch):
        out = step(batch)
        done.append(trainer.step + 1)
        return out

    trainer.train_step = counted
    with pytest.raises(TrainingDiverged, match="NaN/inf"):
        trainer.fit()
    assert len(done) == fails_at - 1 if host_sync == "step" else len(done) == fails_at
