"""Imports flow one way (CONTRIBUTING.md, "Module map"): no cycles, no lower layer importing a higher one.

Every import statement counts, also those inside functions: a function-level import hides a
cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Low to high. A module may import its own layer or lower ones, never a higher one.
LAYERS = [
    ("dmm.schema", "dmm.registry", "dmm.io", "dmm.diffusion", "dmm.data.buckets", "dmm.recipes"),
    ("dmm.models", "dmm.distributed", "dmm.data", "dmm.conditioning", "dmm.sampling"),
    ("dmm.teachers", "dmm.pipeline", "dmm.regions", "dmm.merge", "dmm.data.precompute", "dmm.data.synthesize",
     "dmm.export"),
    ("dmm.losses",),
    ("dmm.objectives",),
    ("dmm.engines",),
    ("dmm.train",),
    ("dmm.toyworld", "dmm.testing"),
    ("eval",),
    ("dmm.cli", "dmm.__main__"),  # the command line: an entry point, like launchers/
]


def layer_of(module: str) -> int | None:
    """The layer of the most specific name that holds `module` (dmm.data.precompute sits above dmm.data)."""
    found = [(len(n), i) for i, names in enumerate(LAYERS) for n in names if module == n or module.startswith(n + ".")]
    return max(found)[1] if found else None


def modules() -> dict[str, Path]:
    out = {}
    for package in ("dmm", "eval"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `name` imports (a `from pkg import sub` names the submodule when it is one)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, name, known) for name, path in mods.items()}


def test_every_module_has_a_layer():
    missing = [m for m in graph() if layer_of(m) is None and m not in ("dmm",)]
    assert not missing, f"modules outside the layer map (add them to LAYERS and CONTRIBUTING.md): {missing}"


def test_no_import_cycles():
    g = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_lower_layer_imports_a_higher_one():
    wrong = []
    for module, targets in graph().items():
        mine = layer_of(module)
        if mine is None:
            continue
        for target in targets:
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the flow (lower layer importing a higher one): " + "; ".join(sorted(wrong))


@pytest.mark.parametrize("core", ["dmm.train", "dmm.models", "dmm.losses", "dmm.engines", "dmm.teachers"])
def test_core_does_not_import_the_toy_world_or_eval(core):
    bad = [f"{m} -> {t}" for m, ts in graph().items() if m == core or m.startswith(core + ".")
           for t in ts if t.startswith(("dmm.toyworld", "eval"))]
    assert not bad, bad


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The walker itself: two modules importing each other inside functions are a cycle."""
    pkg = tmp_path / "dmm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from dmm import b\n")
    (pkg / "b.py").write_text("from dmm.a import f\n")
    (tmp_path / "eval").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    g = graph()
    assert g["dmm.a"] == {"dmm.b"} and g["dmm.b"] == {"dmm.a"}
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()
