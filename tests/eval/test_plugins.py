"""A user's metric and feature extractor, registered by a plugin file, run from the eval CLI unchanged."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.features import FEATURE_EXTRACTORS
from eval.metrics import METRICS
from eval.suite import main

PLUGIN = '''
from dataclasses import dataclass

import torch

from dmm.schema import setting
from eval.features import FEATURE_EXTRACTORS, ModuleFeatures
from eval.metrics import METRICS


@dataclass(frozen=True)
class BrightnessOptions:
    scale: float = setting(1.0, help="multiplier of the mean pixel value")


@METRICS.register("user_brightness", description="mean pixel value times scale", options=BrightnessOptions)
def brightness(options, ctx):
    return lambda images, prompts: (images.mean(dim=(1, 2, 3)) * options.scale).tolist()


class Pooled(torch.nn.Module):
    def forward(self, x):
        p = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return torch.cat([p, p**2], 1)


@FEATURE_EXTRACTORS.register("user_pooled", description="2x2 pooled colours and their squares")
def pooled(cfg):
    return ModuleFeatures(Pooled(), name="user_pooled", dim=24)
'''


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_metrics.py"
    path.write_text(PLUGIN)
    yield path
    for registry, name in ((METRICS, "user_brightness"), (FEATURE_EXTRACTORS, "user_pooled")):
        if name in registry:
            registry.remove(name)
    for name in [n for n in sys.modules if n.startswith("dmm_plugin_my_metrics")]:
        del sys.modules[name]


def _args(tiny_models, tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    teachers = [a for s, p in tiny_models["teachers"].items() for a in ("--teacher", f"{s}={p}")]
    return ["--merged", tiny_models["merged"], *teachers, "--out", str(tmp_path / "eval"), "--prompts", str(prompts),
            "--num-samples", "2", "--steps", "2", "--no-reference", "--no-progress", *extra]


def test_plugin_metric_and_extractor_run_from_the_cli(tiny_models, plugin, tmp_path, capsys):
    assert "user_brightness" not in METRICS  # nothing registers it but the plugin
    rc = main(_args(tiny_models, tmp_path, "--plugin", str(plugin), "--metric", "user_brightness",
                    "--metric-option", "user_brightness.scale=2", "--features", "user_pooled"))
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["features"]["name"] == "user_pooled"
    assert list(report["scores"]) == ["user_brightness"]  # only the selected metric
    assert report["settings"]["metrics"] == ["user_brightness"]
    per_set = report["scores"]["user_brightness"]["per_set"]
    label = f"merged/{tiny_models['styles'][0]}"
    rows = [json.loads(line) for line in (tmp_path / "eval" / "scores_per_image.jsonl").read_text().splitlines()]
    images = [r["image"] for r in rows if r["set"] == label]
    folder = next(f.parent for f in Path(report["cache"]).glob("*/set.json")
                  if json.loads(f.read_text())["label"] == label)
    expected = [2 * np.asarray(Image.open(folder / name).convert("RGB"), dtype=np.float64).mean() / 255
                for name in images]
    assert per_set[label]["mean"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert [r["user_brightness"] for r in rows if r["set"] == label] == pytest.approx(expected, rel=1e-5)


def test_unknown_metric_or_option_is_refused_before_sampling(tiny_models, plugin, tmp_path, capsys):
    assert main(_args(tiny_models, tmp_path, "--plugin", str(plugin), "--metric", "user_brightnes")) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'user_brightnes'; did you mean 'user_brightness'?" in err
    assert main(_args(tiny_models, tmp_path, "--plugin", str(plugin), "--metric", "user_brightness",
                      "--metric-option", "user_brightness.scal=2")) == 2
    assert "did you mean 'scale'?" in capsys.readouterr().err
    assert main(_args(tiny_models, tmp_path, "--plugin", str(tmp_path / "missing.py"))) == 2
    assert "missing.py" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.png"))
