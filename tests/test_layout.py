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
        assert light in graph, light
        for name, deps in graph.items():
            if name == light or name.startswith(f"{light}."):  # policy is a package: its own modules only
                assert {d for d in deps if not d.startswith(f"{light}.")} == set(), name
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


# ---- size: modules under ~400 lines, functions under ~80 --------------------------------------

MAX_MODULE_LINES = 400
#: A function's lines from ``def`` to its end, its docstring not counted (documentation is not length).
MAX_FUNCTION_LINES = 80
#: Text builders only: functions whose length is the text they write, one line per line of output,
#: with no logic to split out. ``path::function`` under the package.
TEXT_BUILDERS = {
    "export/deploy_kit.py::deploy_note",  # DEPLOY.md, section by section
    "export/deploy_snippets.py::cpp_source",  # main.cpp for the device
}


def _function_lengths(path: Path) -> dict[str, int]:
    """``{qualified name: lines without the docstring}`` of every function and method in ``path``."""
    out: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = child.end_lineno - child.lineno + 1
                first = child.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                    n -= first.end_lineno - first.lineno + 1
                out[prefix + child.name] = n
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")

    walk(ast.parse(path.read_text()), "")
    return out


def _too_long(root: Path) -> tuple[list[str], list[str]]:
    """(modules over MAX_MODULE_LINES, functions over MAX_FUNCTION_LINES not in TEXT_BUILDERS)."""
    modules, functions = [], []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        lines = len(p.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            modules.append(f"{rel}: {lines} lines")
        for name, n in _function_lengths(p).items():
            if n > MAX_FUNCTION_LINES and f"{rel}::{name}" not in TEXT_BUILDERS:
                functions.append(f"{rel}::{name}: {n} lines")
    return modules, functions


def test_the_size_check_sees_a_long_module_and_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long_fn.py").write_text(f'def f():\n    """doc\n    more doc"""\n{body}\n    return x0\n')
    short = "\n".join(body.splitlines()[1:])  # def + 79 lines: 80, the docstring not counted
    (tmp_path / "short_fn.py").write_text(f'def g():\n    """doc\n    more doc"""\n{short}\n')
    (tmp_path / "long_mod.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (tmp_path / "nested.py").write_text(f"class C:\n    def m(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n        return 1\n")
    modules, functions = _too_long(tmp_path)
    assert modules == [f"long_mod.py: {MAX_MODULE_LINES + 1} lines"]
    assert functions == [f"long_fn.py::f: {MAX_FUNCTION_LINES + 2} lines", f"nested.py::C.m: {MAX_FUNCTION_LINES + 2} lines"]


def test_no_module_over_400_lines_and_no_function_over_80() -> None:
    modules, functions = _too_long(PKG)
    assert modules == [], modules
    assert functions == [], functions
    for entry in TEXT_BUILDERS:  # the allow-list names functions that exist
        rel, name = entry.split("::")
        assert name in _function_lengths(PKG / rel), entry


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


def test_every_module_is_on_the_room_map() -> None:
    """DEVELOPERS.md's room map names every module of the package (by file name), so a newcomer
    finds each concern there; a new module without a row fails here."""
    text = (PKG.parent / "DEVELOPERS.md").read_text()
    missing = sorted(
        str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and p.name not in text
        and not p.relative_to(PKG).parts[0] == "targets"  # release 0.1's forwarding package
    )
    assert missing == [], f"modules missing from DEVELOPERS.md's room map: {missing}"
