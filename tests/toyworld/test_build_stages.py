"""The toy build as declared stages: dependency order, refusal of missing inputs, resume, plugin styles."""
import json

import numpy as np
import pytest

from dmm.registry import load_plugin
from dmm.toyworld import render, write_shards
from dmm.toyworld.build import Stage, StageError, Stages, make_config, plan, run_stages, stage_graph
from dmm.toyworld.content import Content
from dmm.toyworld.render import render_sample
from dmm.toyworld.styles import list_styles, unregister_style

PLUGIN = '''
import numpy as np
from dmm.toyworld import register_style
from dmm.toyworld.draw import composite, geometry, shape_mask, solid


@register_style("test_plugin_stamp")
def stamp(content, rng):
    """A filled shape on mint paper (a test plugin's style)."""
    return composite(solid((200, 245, 220)), shape_mask(content.shape, geometry(content, rng)), content.rgb)
'''


def test_every_stage_runs_after_what_it_needs():
    graph = stage_graph(["flat", "neon"])
    order = plan(graph)
    assert set(order) == set(graph) and len(order) == len(graph)
    for name in order:
        assert all(order.index(d) < order.index(name) for d in graph[name].needs), name
    assert {"teacher_flat", "teacher_neon"} <= set(graph["classifier"].needs)  # {style}: every style
    assert "teacher_flat" not in graph["teacher_neon"].needs  # {style} in a per-style stage: its own
    assert plan(graph, ["clip"]) == ["tokenizer", "clip"]  # only what a target needs


def test_unknown_inputs_and_cycles_are_named():
    def noop(s, out):
        return {}

    with pytest.raises(StageError, match=r"'b' needs \['nope'\]"):
        plan({"b": Stage("b", noop, ("nope",))})
    with pytest.raises(StageError, match=r"cycle"):
        plan({"a": Stage("a", noop, ("b",)), "b": Stage("b", noop, ("a",))})
    with pytest.raises(StageError, match=r"no stage 'vea'"):
        plan(stage_graph(["flat"]), ["vea"])


def test_stage_with_missing_inputs_is_refused(tmp_path):
    cfg = make_config(tmp_path / "world", "tiny", styles="flat,neon", progress=False)
    with pytest.raises(StageError, match=r"stage 'cond' needs \['tokenizer', 'clip', 'vae', 'data'\]"):
        Stages(cfg, tmp_path / "cache").run("cond")


def test_plugin_style_renders_and_builds_tiny_data_without_editing_dmm(tmp_path):
    path = tmp_path / "my_styles.py"
    path.write_text(PLUGIN)
    try:
        load_plugin(str(path))
        assert "test_plugin_stamp" in list_styles()
        content = Content("square", "red", "large", "top left")
        img = np.asarray(render(content, "test_plugin_stamp", 0))
        assert img[31, 31].tolist() == [200, 245, 220] and img[8, 8, 0] > 180  # mint paper, red square

        cfg = make_config(tmp_path / "world", "tiny", styles="flat,test_plugin_stamp", progress=False,
                          plugins=[str(path)])
        assert cfg.plugins == [str(path.resolve())]  # workers of --jobs N load it again
        assert "teacher_test_plugin_stamp" in stage_graph(cfg.styles)
        stages = Stages(cfg, tmp_path / "cache")
        records = run_stages(stages, ["data"])
        assert list(records) == ["data"]
        with np.load(stages.dir("data") / "data.npz") as z:
            images, style = z["images"], z["style"]
        assert np.array_equal(images[1], np.asarray(render_sample(1, cfg.seed, cfg.styles)[2]))
        assert style[:4].tolist() == [0, 1, 0, 1]  # round-robin over flat and the plugin's style
        # resumable stage by stage: a finished stage is not redone
        done = (stages.dir("data") / "done.json").read_bytes()
        assert run_stages(stages, ["data"])["data"] == json.loads(done)
        assert (stages.dir("data") / "done.json").read_bytes() == done
        shards = write_shards(tmp_path / "shards", 4, seed=0, styles=cfg.styles, samples_per_shard=4)
        assert len(shards) == 1
    finally:
        unregister_style("test_plugin_stamp")


def test_unregistered_style_is_refused_with_the_registered_names(tmp_path):
    with pytest.raises(ValueError, match="unknown toy style 'test_plugin_stamp'.*flat"):
        make_config(tmp_path / "world", "tiny", styles="flat,test_plugin_stamp")
    with pytest.raises(ValueError, match="styles must be a non-empty list"):
        make_config(tmp_path / "world", "tiny", styles="flat,flat")


@pytest.mark.slow
def test_tiny_world_with_a_plugin_style_in_parallel_workers(tmp_path):
    """`--plugin` + `--jobs 2`: spawned stage workers load the plugin again; the world has its teacher."""
    from dmm.toyworld import load_world
    from dmm.toyworld.build import main

    path = tmp_path / "my_styles.py"
    path.write_text(PLUGIN)
    try:
        out = main(["--out", str(tmp_path / "world"), "--scale", "tiny", "--styles", "flat,test_plugin_stamp",
                    "--plugin", str(path), "--jobs", "2", "--cache", str(tmp_path / "cache"), "--no-progress"])
        world = load_world(out)
        assert world.style_names == ["flat", "test_plugin_stamp"]
        assert world.teacher_path("test_plugin_stamp").is_dir()
        assert world.meta["build"]["config"]["plugins"] == [str(path.resolve())]
        assert "test_plugin_stamp" in world.meta["registered_styles"]
    finally:
        unregister_style("test_plugin_stamp")
