"""A user's own engine and teacher format run from a recipe without editing dmm; nothing ever
tries the network.

The recipe lives in its own folder with relative paths and the launcher runs from another
folder; the export and the loading of the merged model then run in a fresh process whose
sockets cannot connect, from a working directory that holds a folder named `dmm`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from dmm.testing import build_tiny_world, tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = textwrap.dedent("""
    from dataclasses import dataclass

    from dmm.engines import ENGINES, SingleProcessEngine
    from dmm.schema import setting
    from dmm.teachers.formats import TEACHER_FORMATS

    STEPS = []


    @dataclass(frozen=True)
    class CountingOptions:
        label: str = setting("x", help="a label recorded with every optimizer step")


    @ENGINES.register("counting", description="one process, recording every optimizer step", options=CountingOptions)
    class CountingEngine(SingleProcessEngine):
        def __init__(self, recipe=None, options=None):
            super().__init__(recipe, options)
            self.label = options.label

        def step(self, which, max_norm):
            STEPS.append((self.label, which))
            return super().step(which, max_norm)


    @dataclass(frozen=True)
    class LoggedOptions:
        tag: str = setting("", help="recorded with every load")


    LOADS = []


    @TEACHER_FORMATS.register("logged_folder", description="a diffusers folder, recording each load",
                              options=LoggedOptions)
    def logged_folder(path, *, base, allow_pickle, options):
        from diffusers import UNet2DConditionModel

        LOADS.append((path.name, options.tag))
        return UNet2DConditionModel.from_pretrained(str(path / "unet"), local_files_only=True)
""")

NO_NETWORK = textwrap.dedent("""
    import socket

    def _refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    socket.socket.connect = _refuse
    socket.create_connection = _refuse
    socket.getaddrinfo = _refuse
""")


def test_user_engine_from_a_recipe_then_offline_export_and_load(tmp_path, monkeypatch):
    world = build_tiny_world(tmp_path / "world", teachers=("a", "b"))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "counting_engine.py").write_text(PLUGIN)
    raw = tiny_recipe_dict(world, "runs/plugin", train={"max_steps": 2, "checkpoint_every": 2},
                           plugins=["counting_engine.py"],
                           distributed={"engine": "counting", "options": {"label": "mine"}})
    # Relative paths in the recipe file: resolved against the recipe's folder, not the current one.
    raw["model"]["base"] = os.path.relpath(world.base, recipes)
    raw["teachers"] = [{"name": n, "path": os.path.relpath(p, recipes)} for n, p in world.teachers.items()]
    raw["teachers"][1].update(format="logged_folder", options={"tag": "b-only"})
    (recipes / "plugin.yaml").write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "dmm").mkdir(parents=True)  # a folder shadowing the package name, as in a clone named dmm
    monkeypatch.chdir(elsewhere)

    sys.path.insert(0, str(ROOT / "launchers"))
    try:
        import train as launcher
    finally:
        sys.path.pop(0)
    assert launcher.main(["--recipe", str(recipes / "plugin.yaml")]) == 0
    merged = elsewhere / "runs" / "plugin" / "merged"
    assert (merged / "unet" / "config.json").is_file()
    plugin = next(m for name, m in sys.modules.items() if name.startswith("dmm_plugin_counting_engine"))
    assert plugin.STEPS == [("mine", "student"), ("mine", "disc")] * 2
    assert plugin.LOADS == [(world.teachers["b"].name, "b-only")]

    # A fresh process, no HF_HUB_OFFLINE, sockets refused, cwd holding a `dmm` folder.
    (tmp_path / "sitecustomize.py").write_text(NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    checkpoint = elsewhere / "runs" / "plugin" / "checkpoints" / "step-00000002"
    script = textwrap.dedent(f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", 9))
        except OSError as err:
            assert "offline test" in str(err), err
        else:
            raise SystemExit("the network guard is not active")
        from dmm.train.export import export_from_checkpoint
        from dmm.pipeline import load_merged
        out = export_from_checkpoint({str(checkpoint)!r}, "again")
        pipe = load_merged(out)
        assert pipe.unet.style_names == ["a", "b"], pipe.unet.style_names
        print("ok", out)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok again" in done.stdout
