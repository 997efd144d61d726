"""The structure docs/design.md describes, checked on the source itself: no import cycles between omniseg's
modules, no probing of models for optional attributes outside the models package, one definition of the
task names, and files written with the usual permissions."""

from __future__ import annotations

import ast
import os
import re
import stat
from pathlib import Path

import omniseg
from omniseg.files import atomic_path

SRC = Path(omniseg.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the omniseg modules it imports, at any level (function-level imports included)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[mod] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    graph[mod].add(target if target in mods else base)
        graph[mod] = {t for t in graph[mod] if t in mods and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_omniseg():
    graph = import_graph()
    assert {"omniseg.api", "omniseg.engine.trainer", "omniseg.models.backbones"} <= set(graph)
    assert "omniseg.engine.evaluate" in graph["omniseg.engine.trainer"]  # the graph sees real imports
    assert cycles(graph) == []


def test_models_are_not_probed_outside_the_models_package():
    """The engine, export, API and hub rely on the Segmenter contract (models/base.py), not on getattr."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if (SRC / "models") in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"getattr\((model|segmenter|self\.model)\b", line):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert offenders == []


def test_task_names_are_defined_once():
    definitions = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                   if re.search(r"^TASKS\s*=", p.read_text(), flags=re.M)]
    assert definitions == ["tasks.py"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.json", durable=True) as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "w.txt"
    target.write_text("old")
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["w.txt"]
