"""Run by the distributed tests under torchrun / the deepspeed launcher (one copy per rank).

  worker.py props RECIPE OUT_DIR            layout, teacher-missing error, sharding, gradient check
  worker.py train RECIPE OUT_DIR [--kill-in-save K]   train (resume: latest), log every step's losses;
                                            --kill-in-save K: SIGKILL itself while writing step K's checkpoint
  worker.py incremental RECIPE OUT_DIR      each rank's supervisors, train.max_steps steps, and rank 0's
                                            single-process replay of them (every slot in one process)
  worker.py averages RECIPE OUT_DIR         the weight averages (optim.ema_decay, SPLAM's target) after
                                            train.max_steps steps against rank 0's replay of them
Results go to OUT_DIR/<mode>.rank<r>.json(l); the test process asserts on them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dmm.distributed import all_gather_object  # noqa: E402
from dmm.engines import SingleProcessEngine, make_engine  # noqa: E402
from dmm.losses.score import SCORE_PART  # noqa: E402
from dmm.recipes import load_recipe, parse_recipe  # noqa: E402
from dmm.train.trainer import DistillationTrainer  # noqa: E402


class SGDTrainer(DistillationTrainer):
    """Plain SGD with lr 1 and no clipping: one step moves every weight by exactly minus its
    (rank-averaged) gradient, so the update itself shows the gradient the engine reduced."""

    def _optimizer(self, which, model):
        return torch.optim.SGD(model.parameters(), lr=1.0)


def props(recipe, out: Path) -> None:
    engine = make_engine(recipe.distributed.engine, recipe)
    rank = engine.rank
    result: dict = {"rank": rank, "world_size": engine.world_size}

    # A teacher that exists nowhere: only the rank that holds it can notice; every rank must stop.
    raw = recipe.to_dict()
    raw["teachers"][1]["path"] = str(Path(raw["teachers"][1]["path"]).parent / "no-such-teacher")
    try:
        DistillationTrainer(parse_recipe(raw), engine=engine)
        result["missing"] = None
    except Exception as err:  # noqa: BLE001
        result["missing"] = [type(err).__name__, str(err)]

    raw = recipe.to_dict()
    raw["optim"]["grad_clip"] = 0.0
    sgd_recipe = parse_recipe(raw)
    trainer = SGDTrainer(sgd_recipe, engine=engine)
    result["local_teachers"] = trainer.local_teachers
    result["loaded_teachers"] = sorted(trainer.teachers)
    result["styles"] = trainer.batch_styles.tolist()
    result["teacher_requires_grad"] = any(p.requires_grad for t in trainer.teachers.values()
                                          for p in t.unet.parameters())
    result["numel"] = {w: engine.local_numel(w) for w in trainer.models}

    before = {w: engine.full_state_dict(w) for w in trainer.models}
    batch = next(iter(trainer.stream))
    gen_state = trainer.generator.get_state()
    losses = {k: float(v) for k, v in trainer.train_step(batch).items()}
    result["losses"] = losses
    after = {w: engine.full_state_dict(w) for w in trainer.models}
    gathered = all_gather_object((batch, gen_state, losses, trainer.batch_styles.tolist()))

    if rank == 0:
        # The single-process reference: every teacher in one process, each rank's batch with that
        # rank's random draws, each weighted 1/W -- the sum over teachers of Eq. 8-9.
        ref_raw = sgd_recipe.to_dict()
        ref_raw["distributed"].update(engine="none", options={})
        ref_raw["train"]["output_dir"] = str(out / "reference")
        ref = SGDTrainer(parse_recipe(ref_raw), engine=SingleProcessEngine())
        ref_losses = []
        for b, g, _, styles in gathered:
            ref.generator.set_state(g)
            ref_losses.append({k: float(v.detach()) for k, v in
                               ref.micro_step(b, torch.tensor(styles), 1.0 / len(gathered)).items()
                               if not k.startswith(SCORE_PART)})  # per-teacher parts: TensorBoard only
        result["reference_losses"] = ref_losses
        result["rank_losses"] = [{k: v for k, v in x[2].items() if k in ref_losses[0]} for x in gathered]
        steps, grads = {}, {}
        for which, model in ref.models.items():
            for name, p in model.named_parameters():
                if p.grad is not None:
                    steps[f"{which}.{name}"] = before[which][name] - after[which][name]  # lr * gradient, lr = 1
                    grads[f"{which}.{name}"] = p.grad.detach().clone()
        torch.save({"steps": steps, "grads": grads}, out / "grads.pt")  # for diagnosing a failure
        # Relative error over each whole model (per-parameter ratios are dominated by float32
        # rounding of p - g where a gradient is ~1e-10 of its weight).
        result["grad_rel_err_by_model"] = {}
        for which in ref.models:
            keys = [k for k in steps if k.startswith(which + ".")]
            a = torch.cat([steps[k].flatten() for k in keys])
            b = torch.cat([grads[k].flatten() for k in keys])
            result["grad_rel_err_by_model"][which] = float((a - b).norm() / b.norm())
        result["grad_count"] = {w: sum(k.startswith(w + ".") for k in steps) for w in ref.models}
        result["param_count"] = {w: len(before[w]) for w in ref.models}
    engine.barrier()
    (out / f"props.rank{rank}.json").write_text(json.dumps(result, indent=1))


def own_te(recipe, out: Path) -> None:
    """Each rank's teacher targets against its teacher's own pipeline (own text encoders on rank 1)."""
    from dmm.objectives.dmm import StepInputs
    from tests.teacher_reference import direct_targets

    trainer = DistillationTrainer(recipe)
    rank = trainer.engine.rank
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 700])
    captions = ["red circle", ""]
    groups = trainer.micro_groups[0]
    inputs = StepInputs(x, captions, trainer.base.encode_captions(captions))
    got, _ = trainer.objective.teacher_outputs(x, t, inputs, groups, want_features=False)
    (i,) = trainer.local_teachers
    ref = direct_targets(Path(recipe.teachers[i].path), x, t, captions, recipe.data.resolution)
    metrics = trainer.train_step(next(iter(trainer.stream)))
    result = {"rank": rank, "teacher": i, "own_encoders": sorted(trainer.teacher_captions),
              "max_diff": float((got - ref).abs().max()), "finite": all(map(math.isfinite, metrics.values()))}
    (out / f"own_te.rank{rank}.json").write_text(json.dumps(result))
    trainer.engine.barrier()


def incremental(recipe, out: Path) -> None:
    """The incremental objective over the ranks: which supervisor each rank holds, then the steps;
    rank 0 replays every step in one process from the gathered batches and generator states (each
    rank's micro-batch weighted 1/W, then the same optimizer steps) and records both losses."""
    raw = recipe.to_dict()
    raw["optim"]["grad_clip"] = 0.0  # no global-norm clipping: the replay's update is the plain AdamW step
    recipe = parse_recipe(raw)
    trainer = DistillationTrainer(recipe)
    engine, rank = trainer.engine, trainer.engine.rank
    result = {"rank": rank, "slots": trainer.slot_names, "local": trainer.local_teachers,
              "loaded": {str(i): t.name for i, t in trainer.teachers.items()}, "styles": trainer.batch_styles.tolist()}
    data, steps = iter(trainer.stream), []
    for _ in range(recipe.train.max_steps):
        batch, gen_state = next(data), trainer.generator.get_state()
        losses = {k: float(v) for k, v in trainer.train_step(batch).items()}
        steps.append(all_gather_object((batch, gen_state, losses, trainer.batch_styles.tolist())))
    if rank == 0:
        ref_raw = recipe.to_dict()
        ref_raw["distributed"].update(engine="none", options={})
        ref_raw["train"]["output_dir"] = str(out / "reference")
        ref = DistillationTrainer(parse_recipe(ref_raw), engine=SingleProcessEngine())
        result["reference_loaded"] = {str(i): t.name for i, t in ref.teachers.items()}
        result["reference_losses"], result["rank_losses"] = [], []
        for gathered in steps:
            per_rank = []
            for b, g, _, styles in gathered:
                ref.generator.set_state(g)
                per_rank.append({k: float(v.detach()) for k, v in
                                 ref.micro_step(b, torch.tensor(styles), 1.0 / len(gathered)).items()
                                 if not k.startswith(SCORE_PART)})
            for which in ref.models:
                ref.engine.step(which, 0.0)
            result["reference_losses"].append(per_rank)
            result["rank_losses"].append([{k: v for k, v in x[2].items() if k in per_rank[0]} for x in gathered])
    engine.barrier()
    (out / f"incremental.rank{rank}.json").write_text(json.dumps(result, indent=1))


def train(recipe, out: Path, kill_in_save: int | None) -> None:
    trainer = DistillationTrainer(recipe)
    if kill_in_save is not None:
        # A hard crash in the middle of writing the checkpoint of step `kill_in_save`: the engine's
        # shards are in the temporary folder, the per-rank state and `latest` are not yet written.
        engine_save = trainer.engine.save

        def save_then_die(folder):
            engine_save(folder)
            if trainer.step == kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.engine.save = save_then_die
    log = open(out / f"train.rank{trainer.engine.rank}.jsonl", "a")
    step_fn = trainer.train_step

    def logged_step(batch):
        metrics = step_fn(batch)
        log.write(json.dumps({"step": trainer.step + 1, **metrics}) + "\n")
        log.flush()
        return metrics

    trainer.train_step = logged_step
    trainer.fit()
    states = {w: trainer.engine.full_state_dict(w) for w in trainer.models}
    if trainer.engine.is_main:
        for which, state in states.items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"final_{which}.safetensors"))
    trainer.engine.barrier()


def averages(recipe, out: Path) -> None:
    """Train max_steps steps keeping averages; rank 0 replays each one from the engine's full state
    dict (another path than the averages' full_params) and reports the largest difference."""
    trainer = DistillationTrainer(recipe)
    data = iter(trainer.stream)
    decays = {name: ema.decay for name, ema in trainer.emas.items()}
    full = trainer.engine.full_state_dict("student")
    expected = {name: {k: full[k].clone() for k in ema.shadow} for name, ema in trainer.emas.items()} \
        if trainer.engine.is_main else {}
    losses = []
    for _ in range(recipe.train.max_steps):
        metrics = trainer.train_step(trainer._next_batches(data))
        losses.append({k: float(v) for k, v in metrics.items()})
        trainer.step += 1
        full = trainer.engine.full_state_dict("student")
        for name, state in expected.items():
            for k in state:
                state[k] = decays[name] * state[k] + (1 - decays[name]) * full[k]
    result = {"rank": trainer.engine.rank, "names": sorted(trainer.emas), "losses": losses, "max_err": {}}
    for name, state in expected.items():
        got = trainer.emas[name].state_dict()
        result["max_err"][name] = max(float((got[k] - v).abs().max()) for k, v in state.items())
        result["moved"] = max(float((got[k] - full[k]).abs().max()) for k in state)
    if "splam_target" in trainer.emas:  # the target is the same whole model on every rank
        target = trainer.emas["splam_target"].state_dict()
        result["target_sum"] = float(sum(v.double().sum() for v in target.values()))
    trainer.engine.barrier()
    (out / f"averages.rank{trainer.engine.rank}.json").write_text(json.dumps(result, indent=1))


def init_average(recipe, out: Path) -> None:
    """Both ranks start the student from the one average rank 0 made (`model.init_average`): rank 0's
    gathered student holds rank 1's shard too."""
    from safetensors.torch import load_file

    trainer = DistillationTrainer(recipe)
    full = trainer.engine.full_state_dict("student")  # a collective: every rank takes part; rank 0 gets it
    if trainer.engine.is_main:
        made = load_file(str(Path(recipe.train.output_dir) / "init_unet.safetensors"))
        err = max(float((full[k].float() - v.float()).abs().max()) for k, v in made.items())
        (out / "init_average.json").write_text(json.dumps({"max_err": err, "keys": len(made)}))
    trainer.engine.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["props", "train", "own_te", "incremental", "averages", "init_average"])
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher adds it
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    if args.mode == "props":
        props(recipe, out)
    elif args.mode == "own_te":
        own_te(recipe, out)
    elif args.mode == "incremental":
        incremental(recipe, out)
    elif args.mode == "averages":
        averages(recipe, out)
    elif args.mode == "init_average":
        init_average(recipe, out)
    else:
        train(recipe, out, args.kill_in_save)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
