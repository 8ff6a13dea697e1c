import numpy as np
import pytest

from dmm.registry import RegistryError, get_registry
from dmm.toyworld import Content, get_style, list_styles, register_style, render
from dmm.toyworld.draw import composite, geometry, shape_mask, solid
from dmm.toyworld.styles import unregister_style


def test_at_least_six_builtin_styles():
    assert {"flat", "outline", "neon", "pixel", "hatched", "sepia"} <= set(list_styles())


def test_register_style_with_one_decorator():
    @register_style("test_stamp", description="test stamp")
    def stamp(content, rng):
        return composite(solid((250, 250, 250)), shape_mask(content.shape, geometry(content, rng)), content.rgb)

    try:
        assert "test_stamp" in list_styles()
        img = render(Content("circle", "red", "large", "top left"), "test_stamp", 0)
        assert img.size == (32, 32)
        assert np.asarray(img)[8, 8].tolist()[0] > 180  # red shape in the top left quadrant
        with pytest.raises(ValueError, match="already registered"):
            register_style("test_stamp")(lambda c, r: None)
        entry = get_registry("toy style").get("test_stamp")  # the generic registry, found by kind
        assert entry.obj is stamp and entry.description == "test stamp"
    finally:
        unregister_style("test_stamp")
    assert "test_stamp" not in list_styles()


def test_unknown_style_lists_known_ones():
    with pytest.raises(RegistryError) as e:
        get_style("neom")
    for name in ("flat", "outline", "neon", "pixel"):
        assert name in str(e.value)
    assert "did you mean 'neon'" in str(e.value)


def test_style_needs_a_description_and_a_lowercase_name():
    with pytest.raises(RegistryError, match="one-line description"):
        register_style("test_nodoc")(lambda c, r: None)
    with pytest.raises(RegistryError, match="lowercase identifiers"):
        register_style("Bad Name", description="x")
    assert "test_nodoc" not in list_styles()


def test_render_and_styles_import_one_way():
    """render -> styles -> draw: neither draw nor styles imports the renderer."""
    import ast
    import inspect

    from dmm.toyworld import draw, styles

    for module in (draw, styles):
        imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(module)))
                    if isinstance(n, ast.ImportFrom) and n.module}
        assert "render" not in imported and "dmm.toyworld.render" not in imported, module.__name__


def test_render_is_deterministic_and_seed_dependent():
    c = Content("triangle", "blue", "small", "bottom right")
    a = np.asarray(render(c, "neon", 7))
    assert np.array_equal(a, np.asarray(render(c, "neon", 7)))
    assert not np.array_equal(a, np.asarray(render(c, "neon", 8)))  # jitter, glow radius


def test_styles_are_visibly_distinct():
    contents = [Content(s, col, "large", p) for s, col, p in
                [("circle", "red", "top left"), ("square", "green", "bottom right"), ("cross", "cyan", "top right")]]
    styles = list_styles()
    imgs = {s: np.stack([np.asarray(render(c, s, i), np.float32) / 255 for i, c in enumerate(contents)])
            for s in styles}
    for i, a in enumerate(styles):
        for b in styles[i + 1:]:
            dist = np.abs(imgs[a] - imgs[b]).mean()
            assert dist > 0.03, (a, b, dist)


def test_content_caption_roundtrip():
    from dmm.toyworld.content import all_contents

    contents = all_contents()
    assert len(contents) == len({c.caption for c in contents}) == 192
    for c in contents[::17]:
        assert Content.from_caption(c.caption) == c
    with pytest.raises(ValueError):
        Content.from_caption("a neon red circle in the top left")
