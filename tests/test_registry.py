"""The one registry pattern: names, descriptions, typed options, duplicates, plugins."""

from dataclasses import dataclass
from typing import Literal

import pytest

from dmm.registry import Registry, RegistryError, get_registry, load_plugin
from dmm.schema import ConfigError, setting


@dataclass(frozen=True)
class BlendOptions:
    strength: float = setting(0.5, help="how much", ge=0.0, le=1.0)
    mode: Literal["add", "mix"] = setting("mix", help="how")


@pytest.fixture
def blends():
    reg = Registry("test blend")
    yield reg
    from dmm import registry

    registry._BY_KIND.pop("test blend", None)


def test_entries_declare_name_description_and_options(blends):
    @blends.register("soft", description="a soft blend", options=BlendOptions)
    def soft(a, b, options):
        return a * (1 - options.strength) + b * options.strength

    entry = blends.get("soft")
    opts = entry.parse_options({"strength": 0.25})
    assert entry.obj(0.0, 4.0, opts) == 1.0 and opts.mode == "mix"
    assert "soft: a soft blend" in blends.describe() and "strength (float, default 0.5)" in blends.describe()
    with pytest.raises(ConfigError, match=r"options.strength must be at most 1.0, got 2"):
        entry.parse_options({"strength": 2})
    with pytest.raises(ConfigError, match=r"unknown key 'options.strenght'; did you mean 'strength'"):
        entry.parse_options({"strenght": 0.1})
    with pytest.raises(ConfigError, match=r"options.mode: 'max' is not one of \['add', 'mix'\]"):
        entry.parse_options({"mode": "max"})


def test_duplicates_are_refused_unless_replaced(blends):
    blends.add("hard", object(), description="first")
    with pytest.raises(RegistryError, match=r"test blend 'hard' is already registered \(first\); pass replace=True"):
        blends.add("hard", object(), description="second")
    blends.add("hard", "new", description="second", replace=True)
    assert blends.get("hard").obj == "new"
    with pytest.raises(RegistryError, match="one-line description"):
        blends.add("x", object(), description="")
    with pytest.raises(RegistryError, match="options must be a dataclass"):
        blends.add("y", object(), description="y", options=dict)


def test_unknown_names_list_the_registered_ones(blends):
    blends.add("gaussian", object(), description="g")
    blends.add("linear", object(), description="l")
    with pytest.raises(RegistryError, match=r"unknown test blend 'gausian'; did you mean 'gaussian'\? "
                                            r"\(registered: gaussian, linear\)"):
        blends.get("gausian")
    with pytest.raises(RegistryError, match=r"unknown test blend 'zzz' \(registered: gaussian, linear\)"):
        blends.get("zzz")
    with pytest.raises(RegistryError, match="no registry of kind 'test blends'; did you mean 'test blend'"):
        get_registry("test blends")


def test_core_registries_are_found_by_kind_with_their_builtins():
    assert {"none", "deepspeed", "fsdp2"} <= set(get_registry("engine").names())
    assert {"diffusers", "single_file", "ckpt"} <= set(get_registry("teacher format").names())
    assert {"shards", "toyworld"} <= set(get_registry("data source").names())
    assert {"weighted_sum", "add_difference", "ties", "dare"} <= set(get_registry("merge method").names())
    assert {"styles", "generate", "export", "merge"} <= set(get_registry("cli verb").names())


def test_plugins_from_a_file_or_a_module(tmp_path, monkeypatch, blends):
    (tmp_path / "my_blend.py").write_text(
        "from dmm.registry import get_registry\n"
        "get_registry('test blend').add('from_file', 1, description='registered by a plugin file')\n")
    load_plugin("my_blend.py", base=tmp_path)
    assert blends.get("from_file").obj == 1
    (tmp_path / "my_blend_mod.py").write_text(
        "from dmm.registry import get_registry\n"
        "get_registry('test blend').add('from_module', 2, description='registered by a plugin module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugin("my_blend_mod")
    assert blends.get("from_module").obj == 2
    with pytest.raises(ConfigError, match=r"plugins: 'nope.py' is not a file"):
        load_plugin("nope.py", base=tmp_path)
    with pytest.raises(ConfigError, match=r"plugins: cannot import 'no_such_module_xyz'"):
        load_plugin("no_such_module_xyz")
