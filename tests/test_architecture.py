"""The layer table of ARCHITECTURE.md holds for the code: no upward imports, no import cycles.

The import graph is built with `ast` (nothing is imported) over the packages `residency`, `policies`,
`pipelines`, `profiles` and `tools`. What counts as an import:

- `import a.b` and `from a.b import c`, absolute and relative (`from . import x`, `from ..plan import y`);
- at module level and anywhere below it: inside functions, methods, classes, `try`/`except` and `if`
  blocks (a lazy import inside a function is still a dependency, and still a cycle when it closes one);
- except under `if TYPE_CHECKING:` (typing only, never executed); its `else:` branch counts.

An edge goes to the most specific module of the scanned packages that the statement names:
`from residency.device import measure_cpu` is an edge to `residency.device.measure_cpu` (a module),
`from policies.ours import _to_plan` an edge to `policies.ours` (the package's `__init__`). Imports of
anything outside the scanned packages (torch, numpy, the standard library) are not edges. Importing a
submodule also runs its parents' `__init__`; those implicit edges are not counted (every module of a
package would otherwise "cycle" with its own `__init__`).

Layers come from the table under "## Layers" in ARCHITECTURE.md: a module belongs to the row that names
its longest dotted prefix; imports within a layer are always allowed; `*` in "may import" means every layer.
The bare `residency` entry stands for the package's own `__init__` only: every module below it must be
named by a row of its own, so a new module cannot fall into the foundation layer unnoticed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
PACKAGES = ("residency", "policies", "pipelines", "profiles", "tools")
EXPLICIT_ROOT = "residency"  # its own row entry covers residency/__init__.py only
ALL = "*"

# --- the checker -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module
    line: int


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]  # dotted prefixes
    may_import: frozenset[str]  # layer names, or {"*"}


def discover(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the given top-level folders of `root`."""
    out: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_statements(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth, except those under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of `name` that is a scanned module, or None."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_edges(modules: Mapping[str, Path]) -> list[Edge]:
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in import_statements(tree):
            if isinstance(node, ast.Import):
                targets = [_known(alias.name, modules) for alias in node.names]
            else:
                if node.level:
                    up = package.split(".") if package else []
                    up = up[: len(up) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    targets.append(sub if sub in modules else _known(base, modules))
            edges += [Edge(name, t, node.lineno) for t in targets if t is not None and t != name]
    return edges


def parse_layer_table(markdown: str) -> list[Layer]:
    """The table under the '## Layers' heading: | layer | modules | may import |, names in backticks."""
    section = re.search(r"^## Layers\b.*?$(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    if section is None:
        raise AssertionError("ARCHITECTURE.md has no '## Layers' section")
    layers = []
    header_seen = False
    for line in section.group(1).splitlines():
        line = line.strip()
        if not line.startswith("|"):
            if header_seen and layers:
                break  # the first table ends
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not header_seen:
            if [c.lower() for c in cells[:3]] != ["layer", "modules", "may import"]:
                raise AssertionError(f"unexpected layer table header: {line}")
            header_seen = True
            continue
        if set(cells[0]) <= set("-: "):
            continue  # the separator row
        names = re.findall(r"`([^`]+)`", cells[0])
        if len(names) != 1:
            raise AssertionError(f"layer cell must hold one `name`: {line}")
        layers.append(Layer(names[0], tuple(re.findall(r"`([^`]+)`", cells[1])),
                            frozenset(re.findall(r"`([^`]+)`", cells[2]))))
    if not layers:
        raise AssertionError("the layer table of ARCHITECTURE.md is empty")
    return layers


def layer_of(module: str, layers: list[Layer], explicit_root: str | None = None) -> str | None:
    """The layer whose longest listed prefix matches; `explicit_root` matches only itself."""
    best, best_len = None, -1
    for layer in layers:
        for prefix in layer.modules:
            if prefix == explicit_root and module != prefix:
                continue
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer.name, len(prefix)
    return best


def upward_imports(edges: Iterable[Edge], layers: list[Layer], explicit_root: str | None = None) -> list[str]:
    """Each import whose target layer the source layer may not import, as a readable line."""
    allowed = {layer.name: layer.may_import for layer in layers}
    out = []
    for e in edges:
        src, dst = layer_of(e.source, layers, explicit_root), layer_of(e.target, layers, explicit_root)
        if src is None or dst is None or src == dst:
            continue
        if ALL in allowed[src] or dst in allowed[src]:
            continue
        out.append(f"{e.source}:{e.line} ({src}) imports {e.target} ({dst})")
    return out


def cycles(edges: Iterable[Edge]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def _show(components: Iterable[frozenset[str]]) -> str:
    return "; ".join(" <-> ".join(sorted(c)) for c in sorted(components, key=sorted))


# --- the repository ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layers() -> list[Layer]:
    return parse_layer_table(ARCHITECTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return discover(ROOT, PACKAGES)


@pytest.fixture(scope="module")
def edges(modules) -> list[Edge]:
    return import_edges(modules)


def test_layer_table_is_well_formed(layers):
    names = [layer.name for layer in layers]
    assert len(set(names)) == len(names), f"a layer is listed twice: {names}"
    prefixes = [p for layer in layers for p in layer.modules]
    assert len(set(prefixes)) == len(prefixes), f"a module is listed in two rows: {prefixes}"
    for layer in layers:
        assert layer.modules, f"layer {layer.name} lists no modules"
        unknown = layer.may_import - set(names) - {ALL}
        assert not unknown, f"layer {layer.name} may import unknown layers {sorted(unknown)}"
        assert layer.name not in layer.may_import, f"layer {layer.name} lists itself (always allowed)"


def test_every_module_has_a_layer(layers, modules):
    missing = sorted(m for m in modules if layer_of(m, layers, EXPLICIT_ROOT) is None)
    assert not missing, ("modules no row of the layer table in ARCHITECTURE.md names (add their package to "
                         f"a row): {missing}")


def test_every_listed_module_exists(layers, modules):
    stale = sorted(p for layer in layers for p in layer.modules
                   if not any(m == p or m.startswith(p + ".") for m in modules))
    assert not stale, f"the layer table names modules that do not exist: {stale}"


def test_no_upward_imports(layers, edges):
    bad = upward_imports(edges, layers, EXPLICIT_ROOT)
    assert not bad, ("imports the layer table of ARCHITECTURE.md does not allow:\n  " + "\n  ".join(bad))


def test_no_import_cycles(edges):
    """No module reaches itself through imports, lazy ones inside functions included."""
    found = cycles(edges)
    assert not found, f"import cycles: {_show(found)}"


# --- the checker itself, on synthetic code -----------------------------------------------------------------

TABLE = """\
# x

## Layers

| layer | modules | may import |
|---|---|---|
| `base` | `app`, `app.util` | — |
| `core` | `app.core` | `base` |
| `ui` | `app.ui` | `core`, `base` |
| `entry` | `app.main` | `*` |

text after the table | with a pipe
"""


def _package(tmp_path: Path, files: Mapping[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return discover(tmp_path, ["app"])


def test_checker_parses_the_table():
    layers = parse_layer_table(TABLE)
    assert [layer.name for layer in layers] == ["base", "core", "ui", "entry"]
    assert layers[0].modules == ("app", "app.util") and layers[0].may_import == frozenset()
    assert layers[2].may_import == {"core", "base"} and layers[3].may_import == {"*"}
    assert layer_of("app.core.engine", layers) == "core"
    assert layer_of("app.util", layers) == "base"
    assert layer_of("app.other", layers) == "base"  # longest prefix: the root
    assert layer_of("app.other", layers, explicit_root="app") is None  # unless the root is explicit
    assert layer_of("elsewhere", layers) is None


def test_checker_reports_an_upward_import(tmp_path):
    """A core module importing the UI — at module level, in a function, relatively — is reported;
    downward imports, same-layer imports and TYPE_CHECKING-only imports are not."""
    modules = _package(tmp_path, {
        "app/__init__.py": "",
        "app/util.py": "import os\n",
        "app/core/__init__.py": "from app.core.engine import run\n",
        "app/core/engine.py": (
            "from typing import TYPE_CHECKING\n"
            "from app import util\n"
            "from . import helpers\n"
            "if TYPE_CHECKING:\n"
            "    from app.ui import view\n"
            "def run():\n"
            "    from ..ui.view import draw\n"
            "    return draw\n"
        ),
        "app/core/helpers.py": "import app.ui.view\n",
        "app/ui/__init__.py": "",
        "app/ui/view.py": "from app.core import engine\ndef draw(): pass\n",
        "app/main.py": "import app.ui.view\nimport app.core\n",
    })
    edges = import_edges(modules)
    pairs = {(e.source, e.target) for e in edges}
    assert ("app.core.engine", "app.util") in pairs  # `from app import util`: the module, not `app`
    assert ("app.core.engine", "app.core.helpers") in pairs  # relative, level 1
    assert ("app.core.engine", "app.ui.view") in pairs  # relative, level 2, inside a function
    assert [e.line for e in edges if e.source == "app.core.engine" and e.target == "app.ui.view"] == [7]
    bad = upward_imports(edges, parse_layer_table(TABLE))
    assert bad == ["app.core.engine:7 (core) imports app.ui.view (ui)",
                   "app.core.helpers:1 (core) imports app.ui.view (ui)"]


def test_checker_finds_cycles():
    e = [Edge("a", "b", 1), Edge("b", "c", 1), Edge("c", "a", 1), Edge("c", "d", 1), Edge("d", "e", 1),
         Edge("e", "d", 1), Edge("f", "a", 1)]
    assert sorted(cycles(e), key=sorted) == [frozenset("abc"), frozenset("de")]
    assert cycles([Edge("a", "b", 1), Edge("b", "c", 1)]) == []
