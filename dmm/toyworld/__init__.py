"""Toy world: a procedural text-to-image world where the whole DMM method runs on a CPU.

Closed-vocabulary captions of coloured shapes, rendered in registered styles; a tiny CLIP, VAE,
base UNet and one teacher per style, all real diffusers/transformers classes saved as pipeline
folders; a classifier that judges style and content and provides toy-FID features.

    from dmm.toyworld import load_world
    world = load_world()                        # assets/toyworld
    pipe = world.load_pipeline("neon")          # a StableDiffusionXLPipeline
    world.classifier.predict(images)            # {"style": ..., "shape": ..., ...}
"""
from .classifier import ClassifierConfig, ToyClassifier
from .content import ATTRIBUTES, Content, all_captions, all_contents, attribute_values, sample_contents, vocabulary
from .render import RESOLUTION, render, render_sample
from .shards import write_shards
from .styles import DEFAULT_STYLES, get_style, list_styles, parse_styles, register_style
from .world import ToyWorld, WorldNotFoundError, load_world

__all__ = [
    "ATTRIBUTES", "DEFAULT_STYLES", "RESOLUTION", "ClassifierConfig", "Content", "ToyClassifier", "ToyWorld",
    "WorldNotFoundError", "all_captions", "all_contents", "attribute_values", "get_style", "list_styles",
    "load_world", "parse_styles", "register_style", "render", "render_sample", "sample_contents", "vocabulary",
    "write_shards",
]
