import pytest
import yaml

from dmm.recipes import RecipeError, load_recipe, parse_recipe

MINIMAL = {
    "name": "t",
    "model": {"base": "base"},
    "teachers": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
    "data": {"shards": ["x.tar"]},
}


def test_defaults_follow_the_paper():
    r = parse_recipe(MINIMAL)
    assert (r.optim.lr, r.loss.lambda_feat, r.loss.lambda_adv) == (1e-5, 0.001, 0.01)
    assert r.data.caption_dropout == 0.1
    assert r.style_names == ["a", "b"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["model"].update(bsae="x"), r"unknown key 'model.bsae'; did you mean 'base'"),
        (lambda d: d.update(trian={}), r"unknown key 'trian'; did you mean 'train'"),
        (lambda d: d["teachers"][0].update(pth="x"), r"teachers\[0\].pth'; did you mean 'path'"),
        (lambda d: d.update(optim={"lr": "fast"}), "optim.lr: expected a number"),
        (lambda d: d.update(distributed={"engine": "horovod"}), r"unknown engine 'horovod'.*registered: .*deepspeed"),
        (lambda d: d.update(distributed={"engine": "deepspeed", "options": {"zero_stag": 3}}),
         r"distributed.options.zero_stag'; did you mean 'zero_stage'"),
        (lambda d: d.update(distributed={"engine": "deepspeed", "zero_stage": 3}), "moved to distributed.options"),
        (lambda d: d.update(optim={"lr": 0}), "optim.lr must be greater than 0"),
        (lambda d: d.update(optim={"disc_lr": -1e-4}), "optim.disc_lr must be greater than 0"),
        (lambda d: d.update(optim={"style_lr_multiplier": -10}), "optim.style_lr_multiplier must be greater than 0"),
        (lambda d: d.update(optim={"betas": [0.9]}), r"optim.betas must be two values"),
        (lambda d: d.update(optim={"betas": [0.9, 1.0]}), r"optim.betas\[1\] must be less than 1"),
        (lambda d: d.update(optim={"lr": float("nan")}), "optim.lr: expected a finite number"),
        (lambda d: d.update(loss={"lambda_feat": float("inf")}), "loss.lambda_feat: expected a finite number"),
        (lambda d: d.update(data={"shards": ["x.tar"], "caption_dropout": 1.0}), "data.caption_dropout must be less than 1"),
        (lambda d: d.update(train={"mixed_precision": "fp8"}), r"train.mixed_precision: 'fp8' is not one of"),
        (lambda d: d["teachers"][0].update(format="safetensor"), r"teachers\[0\].format: unknown teacher format"),
        (lambda d: d.update(teachers=[{"name": "a", "path": "a"}, {"name": "a", "path": "b"}]), "unique"),
        (lambda d: d.update(teachers=[]), "no teachers"),
        (lambda d: d["model"].pop("base"), "model.base"),
        (lambda d: d.update(train={"max_steps": 0}), "max_steps must be at least 1"),
    ],
)
def test_bad_recipes_are_named(mutate, message):
    import copy

    raw = copy.deepcopy(MINIMAL)
    mutate(raw)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(raw)


def test_overrides_and_resolved_copy(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    r = load_recipe(path, ["train.max_steps=10", "loss.lambda_adv=0", "train.output_dir=out", "optim.lr=1e-3"])
    assert r.train.max_steps == 10 and r.loss.lambda_adv == 0.0 and r.train.output_dir == "out"
    assert r.optim.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string; the schema still takes it as a number
    r.save(tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again == r
    with pytest.raises(RecipeError, match="did you mean 'max_steps'"):
        load_recipe(path, ["train.max_step=10"])


def test_unsafe_yaml_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_shipped_recipes_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "recipes"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"toy_sdxl_4.yaml", "toy_sd15_4.yaml", "sdxl_4.yaml", "sd15_8.yaml"} <= set(names)
    for p in root.glob("*.yaml"):
        r = load_recipe(p)
        assert r.optim.lr > 0 and len(r.teachers) >= 2
    assert len(load_recipe(root / "sd15_8.yaml").teachers) == 8
    assert len(load_recipe(root / "sdxl_4.yaml").teachers) == 4


def test_recipe_level_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(RecipeError, match=r"--set optim.lr: the value .* is not valid safe YAML"):
        load_recipe(path, ["optim.lr=[1, 2"])
    with pytest.raises(RecipeError, match="not valid safe YAML"):
        load_recipe(path, ["optim.lr=!!python/object/apply:os.system ['echo hi']"])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RecipeError, match="train.output_dir .* is an existing file"):
        load_recipe(path, [f"train.output_dir={tmp_path / 'afile'}"])


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    monkeypatch.chdir(tmp_path)
    r = load_recipe(path, ["model.base=from_cli"])
    assert r.teachers[0].path == str(folder / "a")  # from the file: against the file's folder
    assert r.data.shards == [str(folder / "x.tar")]
    assert r.model.base == str(tmp_path / "from_cli")  # from --set: against the current folder
    assert r.train.output_dir == "runs/dmm"  # outputs stay relative to where the run starts


def test_every_key_is_documented():
    from dmm.recipes import keys

    docs = keys()
    assert len(docs) > 40
    missing = [d.key for d in docs if not d.help.strip()]
    assert not missing, f"recipe keys without help text: {missing}"
    assert {"train.resume", "optim.lr", "distributed.engine"} <= {d.key for d in docs}
    assert [d.key for d in docs if d.toy] and all(d.key.startswith(("data.toyworld", "sample")) for d in docs if d.toy)


def test_explain_prints_keys_and_sources(tmp_path, capsys):
    from dmm.recipes import main

    assert main(["--explain", "optim"]) == 0
    text = capsys.readouterr().out
    assert "optim.style_lr_multiplier" in text and "> 0.0" in text and "train.max_steps" not in text
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["--explain", str(path), "--set", "train.max_steps=7"]) == 0
    lines = {line.split("=")[0].strip(): line for line in capsys.readouterr().out.splitlines() if "=" in line}
    assert lines["train.max_steps"].rstrip().endswith("# --set") and " 7 " in lines["train.max_steps"]
    assert lines["name"].rstrip().endswith("# file")
    assert lines["optim.lr"].rstrip().endswith("# default")
    assert main(["--explain", "optimm"]) == 2


def test_resumable_keys_come_from_the_schema():
    from dmm.recipes import is_resumable

    assert is_resumable("train.max_steps") and is_resumable("sample.steps") and is_resumable("data.num_workers")
    assert not is_resumable("optim.lr") and not is_resumable("teachers[0].path") and not is_resumable("name")


def test_a_user_registered_engine_runs_from_a_recipe(tmp_path):
    """A plugin file registers an engine; the recipe names it and its options; dmm is not edited."""
    plugin = tmp_path / "my_engine.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "from dmm.engines import ENGINES, SingleProcessEngine\n"
        "from dmm.schema import setting\n"
        "CALLS = []\n"
        "@dataclass(frozen=True)\n"
        "class Opts:\n"
        "    tag: str = setting('x', help='a tag')\n"
        "@ENGINES.register('counting_in_recipe_test', description='single process, counting steps', options=Opts)\n"
        "class Counting(SingleProcessEngine):\n"
        "    def __init__(self, recipe=None, options=None):\n"
        "        super().__init__(recipe, options)\n"
        "        self.tag = options.tag\n"
        "    def step(self, which, max_norm):\n"
        "        CALLS.append((self.tag, which))\n"
        "        return super().step(which, max_norm)\n"
    )
    raw = {**MINIMAL, "plugins": [str(plugin)],
           "distributed": {"engine": "counting_in_recipe_test", "options": {"tag": "t1"}}}
    r = parse_recipe(raw)
    from dmm.engines import make_engine

    engine = make_engine(r.distributed.engine, r)
    assert type(engine).__name__ == "Counting" and engine.tag == "t1"
    with pytest.raises(RecipeError, match="options.tagg'; did you mean 'tag'"):
        parse_recipe({**raw, "distributed": {"engine": "counting_in_recipe_test", "options": {"tagg": 1}}})
