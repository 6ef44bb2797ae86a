"""The package's import architecture, read from the source with :mod:`ast` (nothing is imported).

Two rules (issue 13):

1. **The core is pure.** ``forgeqmp.core`` does no I/O and no concurrency: a core module imports
   only other core modules, :mod:`forgeqmp.errors`, and the standard-library and ``attrs``
   modules of :data:`CORE_MAY_IMPORT`; and no core module reaches one of :data:`FORBIDDEN`,
   directly or through the forgeqmp modules it imports. ``os`` is allowed for path *text* only:
   a core module may use nothing of ``os`` but the names in :data:`OS_PATH_TEXT` (checked on
   every ``os.`` attribute it uses); reading files, directories or their metadata belongs in
   ``forgeqmp.adapters``.
2. **No import cycles** among forgeqmp's modules, imports deferred into functions included (an
   import on use hides a cycle from the reader, not from the design). No exception.

What counts as an import: every ``import`` and ``from ... import`` statement anywhere in a module
(at top level, in functions, in ``try`` blocks), relative ones resolved. ``from pkg import name``
is an import of ``pkg.name`` when that is a module, else of ``pkg``. Imports under
``if TYPE_CHECKING:`` are left out of both rules: they never run, and mypy resolves cycles among
annotations itself. A module's parent packages are not counted as its imports: importing
``forgeqmp.core.states`` runs ``forgeqmp/__init__.py`` (the public API, which imports the whole
package), which is where the package keeps its names, not a dependency of the state machine.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs
import pytest

import forgeqmp

PACKAGE_DIR = Path(forgeqmp.__file__).parent

#: Modules that do I/O or concurrency: no core module may reach one, directly or transitively.
FORBIDDEN = frozenset(
    {
        "asyncio",
        "anyio",
        "qemu",
        "socket",
        "subprocess",
        "threading",
        "signal",
        "fcntl",
        "tempfile",
        "shutil",
        "select",
        "concurrent",
        "multiprocessing",
        "selectors",
        "logging",
    }
)

#: Outside forgeqmp, what a core module may import (top-level names): values, text and rules.
CORE_MAY_IMPORT = frozenset(
    {
        "__future__",
        "attrs",
        "collections",
        "contextlib",
        "dataclasses",
        "datetime",
        "enum",
        "functools",
        "itertools",
        "json",
        "math",
        "os",  # path text only, see OS_PATH_TEXT
        "re",
        "shlex",
        "types",
        "typing",
        "uuid",
    }
)

#: The parts of ``os`` a core module may use: path text, no file system access. (``abspath``
#: reads the process's working directory, not the file system.)
OS_PATH_TEXT = frozenset(
    {
        "os.PathLike",
        "os.fspath",
        "os.sep",
        "os.path.abspath",
        "os.path.basename",
        "os.path.commonpath",
        "os.path.dirname",
        "os.path.isabs",
        "os.path.join",
        "os.path.normpath",
        "os.path.split",
        "os.path.splitext",
    }
)


@attrs.frozen
class Import:
    """One import statement's target, where it is, and whether it only runs for type checkers."""

    target: str
    line: int
    type_checking: bool


@attrs.frozen
class Module:
    name: str
    is_package: bool
    tree: ast.Module


def discover(package_dir: Path, package: str) -> dict[str, Module]:
    """Every module of the package under ``package_dir``, by dotted name, parsed."""
    found: dict[str, Module] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found[".".join(parts)] = Module(".".join(parts), is_package, tree)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(body: Iterable[ast.AST], type_checking: bool) -> Iterable[tuple[ast.AST, bool]]:
    """Every node below ``body``, with whether it sits under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.body, True)
            yield from _statements(node.orelse, type_checking)
            continue
        yield node, type_checking
        yield from _statements(ast.iter_child_nodes(node), type_checking)


def imports_of(module: Module, known: Mapping[str, Module]) -> list[Import]:
    """What ``module`` imports, resolved to module names (forgeqmp ones exactly)."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    result: list[Import] = []
    for node, type_checking in _statements(module.tree.body, False):
        if isinstance(node, ast.Import):
            for alias in node.names:
                result.append(Import(alias.name, node.lineno, type_checking))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in known else base
                result.append(Import(target, node.lineno, type_checking))
    return result


def internal_target(name: str, known: Mapping[str, Module]) -> str | None:
    """The forgeqmp module an import of ``name`` loads (``import a.b.c``: the deepest known)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def runtime_graph(known: Mapping[str, Module]) -> dict[str, dict[str, int]]:
    """forgeqmp module -> forgeqmp module it imports at run time -> line of the first import."""
    graph: dict[str, dict[str, int]] = {name: {} for name in known}
    for name, module in known.items():
        for imp in imports_of(module, known):
            target = internal_target(imp.target, known)
            if imp.type_checking or target is None or target == name:
                continue
            graph[name].setdefault(target, imp.line)
    return graph


def _top(name: str) -> str:
    return name.partition(".")[0]


def purity_violations(known: Mapping[str, Module], core: str) -> list[str]:
    """Why the modules of package ``core`` are not pure, one line each (empty: they are)."""
    root = _top(core)
    allowed_internal = (core, f"{root}.errors")
    problems: list[str] = []
    for name, module in sorted(known.items()):
        if not (name == core or name.startswith(core + ".")):
            continue
        for imp in imports_of(module, known):
            if imp.type_checking:
                continue
            target = internal_target(imp.target, known)
            if target is not None:
                if not any(target == a or target.startswith(a + ".") for a in allowed_internal):
                    problems.append(f"{name}:{imp.line} imports {target}, outside the core")
            elif _top(imp.target) in FORBIDDEN:
                problems.append(f"{name}:{imp.line} imports {imp.target}, which does I/O")
            elif _top(imp.target) not in CORE_MAY_IMPORT:
                problems.append(f"{name}:{imp.line} imports {imp.target}, not in CORE_MAY_IMPORT")
        problems.extend(_os_misuse(module))
    graph = runtime_graph(known)
    for name in sorted(graph):
        if name == core or name.startswith(core + "."):
            chain = _reaches_forbidden(name, known, graph)
            if chain:
                problems.append(f"{name} reaches I/O: {' -> '.join(chain)}")
    return problems


def _os_misuse(module: Module) -> list[str]:
    """Uses of ``os`` beyond path text (``os.x.y`` attribute chains, and ``from os import``)."""
    problems: list[str] = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("os", "os.path"):
            problems.append(
                f"{module.name}:{node.lineno} 'from {node.module} import': use os.path."
            )
        if not isinstance(node, ast.Attribute):
            continue
        chain = ast.unparse(node)
        if not chain.startswith("os."):
            continue
        if chain in OS_PATH_TEXT or chain == "os.path":
            continue
        if any(allowed.startswith(chain + ".") for allowed in OS_PATH_TEXT):
            continue  # the inner node of an allowed chain (os.path of os.path.join)
        problems.append(f"{module.name}:{node.lineno} uses {chain}, not path text")
    return problems


def _reaches_forbidden(
    start: str, known: Mapping[str, Module], graph: Mapping[str, Mapping[str, int]]
) -> list[str] | None:
    """The import chain from ``start`` to a forbidden module, through forgeqmp modules."""
    seen = {start}
    queue: list[list[str]] = [[start]]
    while queue:
        path = queue.pop(0)
        for imp in imports_of(known[path[-1]], known):
            if (
                not imp.type_checking
                and _top(imp.target) in FORBIDDEN
                and internal_target(imp.target, known) is None
            ):
                return [*path, imp.target]
        for nxt in sorted(graph[path[-1]]):
            if nxt not in seen:
                seen.add(nxt)
                queue.append([*path, nxt])
    return None


def find_cycle(graph: Mapping[str, Mapping[str, int]]) -> list[str] | None:
    """One import cycle as the path that closes it (first == last), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        on_path = {start}
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                on_path.discard(node)
                done.add(node)
                continue
            nxt = todo.pop(0)
            if nxt in on_path:
                path = [n for n, _ in stack]
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                stack.append((nxt, sorted(graph[nxt])))
                on_path.add(nxt)
    return None


def _describe(cycle: list[str], graph: Mapping[str, Mapping[str, int]]) -> str:
    return (
        " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle))
        + f" -> {cycle[-1]}"
    )


# --- the package -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package() -> dict[str, Module]:
    return discover(PACKAGE_DIR, "forgeqmp")


def test_the_core_is_pure(package: dict[str, Module]) -> None:
    assert "forgeqmp.core.states" in package  # the walk found the core
    problems = purity_violations(package, "forgeqmp.core")
    assert not problems, "forgeqmp.core must do no I/O or concurrency:\n" + "\n".join(problems)


def test_no_import_cycles(package: dict[str, Module]) -> None:
    graph = runtime_graph(package)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + _describe(cycle, graph)


#: The layers, lowest first: a module imports only from its own layer or lower ones. The core
#: (with the errors every layer raises) knows nothing of the others; the adapters talk to QEMU,
#: files and processes in the core's terms; the operations run the core's plans through the
#: adapters; the top (``forge``, ``cli``, ``sync``, ``terminal``, the package) offers them, and
#: the test harness drives everything.
LAYERS = (
    ("forgeqmp.core", "forgeqmp.errors", "forgeqmp._version"),
    ("forgeqmp.adapters",),
    ("forgeqmp.ops",),
    ("forgeqmp",),  # forge, cli, sync, terminal, __init__, __main__
    ("forgeqmp.testing",),
)


def layer_of(module: str) -> int:
    """The layer of ``module``: the last (most specific) prefix in :data:`LAYERS` it falls under."""
    found = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            under = module == prefix or module.startswith(prefix + ".")
            if under and (found is None or len(prefix) > found[1]):
                found = (index, len(prefix))
    assert found is not None, module
    return found[0]


def layer_violations(graph: Mapping[str, Mapping[str, int]]) -> list[str]:
    return [
        f"{importer} (layer {layer_of(importer)}) imports {imported} (layer "
        f"{layer_of(imported)}) at line {line}"
        for importer, targets in sorted(graph.items())
        for imported, line in sorted(targets.items())
        if layer_of(imported) > layer_of(importer)
    ]


def test_layers_import_only_downward(package: dict[str, Module]) -> None:
    assert layer_of("forgeqmp.core.plans.enable") == 0
    assert layer_of("forgeqmp.adapters.qmp") == 1
    assert layer_of("forgeqmp.ops.context") == 2
    assert layer_of("forgeqmp.forge") == 3
    assert layer_of("forgeqmp.testing.instance") == 4
    problems = layer_violations(runtime_graph(package))
    assert not problems, "an import against the layers:\n" + "\n".join(problems)


def test_an_upward_import_is_reported() -> None:
    graph = {"forgeqmp.adapters.qmp": {"forgeqmp.ops.context": 7}, "forgeqmp.ops.context": {}}
    assert layer_violations(graph) == [
        "forgeqmp.adapters.qmp (layer 1) imports forgeqmp.ops.context (layer 2) at line 7"
    ]


# --- the checks themselves, on made-up packages --------------------------------------------------


def _fake(tmp_path: Path, files: Mapping[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return discover(tmp_path / "pkg", "pkg")


_CORE = {"__init__.py": "", "errors.py": "import re\n", "core/__init__.py": ""}


def test_a_pure_core_passes(tmp_path: Path) -> None:
    known = _fake(
        tmp_path,
        {
            **_CORE,
            "core/a.py": "import os\nimport attrs\nfrom pkg.core import b\nX = os.path.join\n",
            "core/b.py": "from typing import TYPE_CHECKING\nfrom ..errors import E\n"
            "if TYPE_CHECKING:\n    import socket\n    from pkg import io\n",
            "io.py": "import socket\n",
        },
    )
    assert purity_violations(known, "pkg.core") == []
    assert find_cycle(runtime_graph(known)) is None


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import socket\n", "imports socket, which does I/O"),
        ("def f():\n    import subprocess\n", "imports subprocess, which does I/O"),
        ("from qemu.qmp import QMPClient\n", "imports qemu.qmp, which does I/O"),
        ("import pathlib\n", "imports pathlib, not in CORE_MAY_IMPORT"),
        ("from pkg import io\n", "imports pkg.io, outside the core"),
        ("from .. import io\n", "imports pkg.io, outside the core"),
        ("try:\n    import pkg.io\nexcept ImportError:\n    pass\n", "outside the core"),
        ("import os\nos.stat('/')\n", "uses os.stat, not path text"),
        ("import os\nos.path.exists('/')\n", "uses os.path.exists, not path text"),
        ("from os.path import exists\n", "'from os.path import'"),
    ],
)
def test_an_impure_core_fails(tmp_path: Path, source: str, expected: str) -> None:
    known = _fake(tmp_path, {**_CORE, "core/a.py": source, "io.py": "import socket\n"})
    problems = purity_violations(known, "pkg.core")
    assert any(expected in p and p.startswith("pkg.core.a") for p in problems), problems


def test_io_reached_through_another_module_is_reported_with_its_chain(tmp_path: Path) -> None:
    known = _fake(
        tmp_path,
        {
            **_CORE,
            "errors.py": "from pkg import io\n",  # allowed to the core, but it does I/O
            "core/a.py": "from pkg.core import b\n",
            "core/b.py": "from pkg.errors import E\n",
            "io.py": "def f():\n    import anyio\n",
        },
    )
    problems = purity_violations(known, "pkg.core")
    assert "pkg.core.a reaches I/O: pkg.core.a -> pkg.core.b -> pkg.errors -> pkg.io -> anyio" in (
        problems
    )


def test_a_cycle_through_a_deferred_import_is_found_with_its_path(tmp_path: Path) -> None:
    known = _fake(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg import b\n",
            "b.py": "import pkg.c\n",
            "c.py": "def f():\n    from pkg.a import thing\n",
            "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
        },
    )
    graph = runtime_graph(known)
    cycle = find_cycle(graph)
    assert cycle == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert _describe(cycle, graph) == (
        "pkg.a (line 1) -> pkg.b (line 1) -> pkg.c (line 2) -> pkg.a"
    )
    assert "pkg.a" not in graph["pkg.d"]  # TYPE_CHECKING-only: not a run-time import
