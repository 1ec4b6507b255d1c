"""The layers the code has, over its real import graph: every `import` of the project's modules, at
module level or inside a function, and every registry's by-name import (`methods.MODULES`,
`tasks.MODULES`: `importlib.import_module(f'<package>.<name>')`).

    util/                      the ground floor: imports nothing of the project
    model/, dataset/           util/ only
    methods/, tasks/           model/, dataset/, util/ (not each other)
    engine/                    the loop's machinery: everything below it
    entry scripts, tools/      on top: anything but each other's entry scripts

No upward arrow and no cycle between packages; entry scripts never import each other.

    python -m pytest tests/test_layers.py -q
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import methods
import tasks

ROOT = Path(__file__).resolve().parents[1]
LAYER = {'util': 0, 'model': 1, 'dataset': 1, 'methods': 2, 'tasks': 2, 'engine': 3}
TOP = 4                                   # entry scripts, tools/, anything else outside the packages
REGISTRIES = {'methods/__init__.py': ('methods', methods.MODULES), 'tasks/__init__.py': ('tasks', tasks.MODULES)}
ENTRY_SCRIPTS = {p.stem for p in ROOT.glob('*.py')} - {'conftest', 'hubconf', 'segmenter'}


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every Python file of the project but the tests."""
    out = {}
    for path in ROOT.rglob('*.py'):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ('tests', '.git') or any(part.startswith('.') for part in rel.parts):
            continue
        parts = rel.with_suffix('').parts
        out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in it (function-level imports included), and
    those its registry imports by name."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        for name in names:
            while name and name not in modules:        # `from a.b import c`: a.b.c if a module, else a.b
                name = name.rpartition('.')[0]
            if name:
                found.add(name)
    rel = str(path.relative_to(ROOT))
    if rel in REGISTRIES:
        package, members = REGISTRIES[rel]
        found |= {f'{package}.{m}' for m in members}
    return found


def layer_of(module: str) -> int:
    """A package's `__main__` (`python -m methods`, `python -m model`) is a command-line entry, on top."""
    return TOP if module.endswith('.__main__') else LAYER.get(module.split('.')[0], TOP)


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def upward_arrows(edges: dict[str, set[str]]) -> list[str]:
    """Imports that break the layering: to a higher layer, or sideways to another package of the
    same layer (model <-> dataset, methods <-> tasks), or from one entry script to another."""
    bad = []
    for src, dsts in sorted(edges.items()):
        for dst in sorted(dsts):
            a, b = src.split('.')[0], dst.split('.')[0]
            if layer_of(dst) > layer_of(src) or (a != b and layer_of(src) == layer_of(dst) < TOP):
                bad.append(f'{src} -> {dst}')
            elif src in ENTRY_SCRIPTS and dst in ENTRY_SCRIPTS:
                bad.append(f'{src} -> {dst} (entry scripts never import each other)')
    return bad


def package_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of the package graph (util, model, ..., and each top-level script as its own)."""
    pkg = {}
    for src, dsts in edges.items():
        pkg.setdefault(src.split('.')[0], set()).update(d.split('.')[0] for d in dsts)
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 'open'
        for nxt in sorted(pkg.get(node, ()) - {node}):
            if state.get(nxt) == 'open':
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 'done'

    for node in sorted(pkg):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_goes_up_a_layer():
    assert upward_arrows(graph()) == []


def test_no_cycle_between_packages():
    assert package_cycles(graph()) == []


def test_the_graph_sees_function_level_and_registry_imports():
    edges = graph()
    assert 'methods.unimatch_v2' in edges['methods'] and 'tasks.classification' in edges['tasks']
    source = 'def f():\n    from engine.loop import fit\n'
    fake = ROOT / 'util' / '_layers_probe.py'
    try:
        fake.write_text(source)
        edges = graph()
        assert 'util._layers_probe -> engine.loop' in upward_arrows(edges)
    finally:
        fake.unlink()


@pytest.mark.parametrize('edges, cycle', [
    ({'util.a': {'model.b'}, 'model.b': {'util.a'}}, ['model', 'util', 'model']),
    ({'util.a': set(), 'model.b': {'util.a'}}, None),
])
def test_the_cycle_check_can_fail(edges, cycle):
    assert package_cycles(edges) == ([cycle] if cycle else [])
