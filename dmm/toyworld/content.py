"""What an image shows: a closed vocabulary of scene attributes, deterministic sampling, captions.

Captions describe the content only, never the style: the style is what a teacher (or the merged
student's style code) adds, so the same caption must be renderable in every style.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 60, 225),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "cyan": (20, 190, 210),
}
SIZES: dict[str, float] = {"small": 0.16, "large": 0.26}  # shape radius as a fraction of the image side
# Four quadrants: spatial attributes must stay learnable by a ~1M-parameter UNet on 2 CPU cores.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")


def attribute_values(attribute: str) -> tuple[str, ...]:
    """The closed list of values of one content attribute (class order of the classifier heads)."""
    table = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS)}
    if attribute not in table:
        raise KeyError(f"unknown attribute {attribute!r}; known: {list(table)}")
    return table[attribute]


@dataclass(frozen=True)
class Content:
    """One scene: a single coloured shape of some size in one quadrant."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for attribute in ATTRIBUTES:
            value = getattr(self, attribute)
            if value not in attribute_values(attribute):
                raise ValueError(f"{attribute}={value!r} not in {list(attribute_values(attribute))}")

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} in the {self.position}"

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    def labels(self) -> dict[str, int]:
        """Class index per attribute, as the classifier predicts them."""
        return {a: attribute_values(a).index(getattr(self, a)) for a in ATTRIBUTES}

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Content":
        return cls(*(str(rng.choice(attribute_values(a))) for a in ATTRIBUTES))

    @classmethod
    def from_caption(cls, caption: str) -> "Content":
        """Inverse of `caption`; raises ValueError for text outside the closed caption set."""
        words = caption.strip().lower().split()
        if len(words) != 8 or words[0] != "a" or words[4:6] != ["in", "the"]:
            raise ValueError(f"not a toy-world caption: {caption!r}")
        return cls(shape=words[3], colour=words[2], size=words[1], position=" ".join(words[6:]))


def all_contents() -> list[Content]:
    """Every content of the closed world, in a fixed order (the cached caption set)."""
    return [Content(*v) for v in itertools.product(*(attribute_values(a) for a in ATTRIBUTES))]


def all_captions() -> list[str]:
    return [c.caption for c in all_contents()]


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted: each becomes exactly one tokenizer token."""
    words = {"a", "in", "the"}
    for c in all_contents():
        words.update(c.caption.split())
    return sorted(words)


def sample_contents(n: int, seed: int) -> list[Content]:
    """n contents, deterministic from the seed."""
    rng = np.random.default_rng(seed)
    return [Content.sample(rng) for _ in range(n)]
