"""The package's layout: data flows one way (no import cycle, counting imports inside functions),
and the rooms that must stay light import nothing they should not."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lightning_ncnnqat"
ROOT = PKG.name


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every package module a module imports, at module level or inside a function."""
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        out[name] = {m for m in found if m in mods and m != name}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_a_cycle_when_there_is_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    graph = _imports(_modules())
    assert len(graph) > 40  # the walk found the package
    assert _cycles(graph) == []


def test_light_rooms_import_nothing_heavy() -> None:
    """``errors`` and ``policy`` import nothing from the package (every room may use them); the
    ncnn worker runs in a child process without torch or the package."""
    mods = _modules()
    graph = _imports(mods)
    for light in (f"{ROOT}.errors", f"{ROOT}.policy"):
        assert graph[light] == set(), light
    worker = mods[f"{ROOT}.ncnn.worker"].read_text()
    tree = ast.parse(worker)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert not imported & {"torch", ROOT}, imported


def test_the_ncnn_layer_imports_without_torch() -> None:
    """The ncnn layer (formats, int8 writer, runtime, targets) runs where torch is absent (a
    board, the emulated ARM targets): importing it with torch made unimportable still works."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import lightning_ncnnqat.ncnn.param, lightning_ncnnqat.ncnn.table, lightning_ncnnqat.ncnn.int8_writer\n"
        "import lightning_ncnnqat.ncnn.isolated, lightning_ncnnqat.ncnn.runtime, lightning_ncnnqat.ncnn.targets\n"
        "import lightning_ncnnqat.ncnn.targets.check, lightning_ncnnqat.ncnn.targets.build\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_ncnn_layer_uses_no_other_room() -> None:
    """Data flows one way: calibration, conversion, verification and export use the ncnn layer;
    it uses only ``errors``."""
    graph = _imports(_modules())
    for name, deps in graph.items():
        if name.startswith(f"{ROOT}.ncnn"):
            outside = {d for d in deps if not d.startswith(f"{ROOT}.ncnn") and d != f"{ROOT}.errors" and d != ROOT}
            assert not outside, (name, outside)


def test_old_module_paths_forward_with_a_warning() -> None:
    """Release 0.1's module paths still import for one release: the same module object, and a
    DeprecationWarning naming the new path."""
    import importlib
    import sys
    import warnings

    from lightning_ncnnqat._moved import MOVED

    assert len(MOVED) > 30
    for old, new in [("export.ncnn_param", "ncnn.param"), ("prepare", "qat.prepare"), ("export.runtime_checks", "verification.runtime_checks"), ("qat_start", "start")]:
        assert MOVED[old] == new
        sys.modules.pop(f"{ROOT}.{old}", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mod = importlib.import_module(f"{ROOT}.{old}")
        assert mod is importlib.import_module(f"{ROOT}.{new}")
        assert any(issubclass(w.category, DeprecationWarning) and f"{ROOT}.{new}" in str(w.message) for w in caught), old
    # every forwarded path resolves to a module that exists
    for old, new in MOVED.items():
        assert importlib.util.find_spec(f"{ROOT}.{new}") is not None, (old, new)


# The rooms, lowest first (DEVELOPERS.md draws the same order): a room imports only rooms before it.
ROOMS = [
    "errors", "policy", "files", "preprocessing", "_moved", "ncnn", "ops", "qat", "conversion", "calibration",
    "verification", "export", "speed", "start", "callbacks", "cli_inputs", "__main__", "targets",
]


def test_rooms_import_only_rooms_below_them() -> None:
    graph = _imports(_modules())
    room = {m: m.split(".")[1] for m in graph if m.count(".") >= 1}
    unknown = sorted({r for r in room.values() if r not in ROOMS})
    assert not unknown, f"rooms missing from ROOMS (and DEVELOPERS.md): {unknown}"
    upward = [
        (a, d) for a, deps in graph.items() for d in deps
        if a in room and d in room and ROOMS.index(room[d]) > ROOMS.index(room[a])
    ]
    assert upward == [], upward


def test_submodules_load_as_attributes_and_old_ones_forward() -> None:
    """A room used as an attribute after ``import lightning_ncnnqat`` loads on first use
    (``lq.qat``), and a release-0.1 module used as an attribute forwards with its warning."""
    import subprocess
    import sys

    code = (
        "import warnings\n"
        "import lightning_ncnnqat as lq\n"
        "import types\n"
        "assert isinstance(lq.qat, types.ModuleType) and isinstance(lq.ncnn, types.ModuleType) and callable(lq.export)\n"
        "import lightning_ncnnqat.qat.plan\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert lq.prepare.get_plan is lq.qat.plan.get_plan\n"
        "assert any('lightning_ncnnqat.qat.prepare' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "try:\n"
        "    lq.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
