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
        (lambda d: d["model"].update(bsae="x"), r"unknown recipe key 'model.bsae'; did you mean 'base'"),
        (lambda d: d.update(trian={}), r"unknown recipe key 'trian'; did you mean 'train'"),
        (lambda d: d["teachers"][0].update(pth="x"), r"teachers\[0\].pth'; did you mean 'path'"),
        (lambda d: d.update(optim={"lr": "fast"}), "optim.lr: expected a number"),
        (lambda d: d.update(distributed={"engine": "horovod"}), "not one of"),
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
