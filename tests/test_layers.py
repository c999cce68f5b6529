"""The package's layers, bottom to top, and the rules between them.

    core (pure math) → runtime → config → models → data → train → evaluate → search, verify → cli

The runtime (Ray connection, console, storage by URI, secrets, safe loading) sits below the
configuration: the checks of a config use its URI schemes and secret patterns, while it needs no
config (`ray_env.ensure_ray` takes any object with a RunConfig's fields).

A module may import its own package and the packages below it, never one above (`errors` at the
root is for everyone). No two modules import each other, directly or through others, whether the
import sits at the top of the module or inside a function: a cycle hidden in a function is still
a cycle. An import inside a function is kept only where importing at the top would be measurably
slow (torch, Ray, transformers behind it on a path that must start fast); the line says so.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "safedpo_ray"
LAYERS = {"errors": -1, "core": 0, "runtime": 1, "config": 2, "models": 3, "data": 4, "train": 5,
          "evaluate": 6, "search": 7, "verify": 7, "cli": 8}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, names: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of this package in `path`
    (an `if TYPE_CHECKING:` block imports nothing when the code runs)."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("safedpo_ray"):
                for alias in child.names:  # `from pkg import module` names a module
                    sub = f"{child.module}.{alias.name}"
                    found.append((sub if sub in names else child.module, child.lineno, in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("safedpo_ray"))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "safedpo_ray"


def test_every_package_has_a_layer():
    assert {_layer(m) for m in _modules()} - {"safedpo_ray"} == set(LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for imported, line, _ in _imports(path, set(modules)):
            if LAYERS.get(_layer(imported), -1) > LAYERS.get(_layer(name), 99) or (
                    LAYERS.get(_layer(imported)) == LAYERS.get(_layer(name)) and _layer(imported) != _layer(name)):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    assert not wrong, "imports of a layer above (or beside) the importer's own:\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {m for m, _, _ in _imports(path, set(modules)) if m in modules and m != name}
             for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" → ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_level_imports_say_why():
    """An import of this package inside a function carries a comment: why not at the top."""
    modules = _modules()
    silent = []
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        for imported, line, in_function in _imports(path, set(modules)):
            if in_function and "#" not in lines[line - 1] and not lines[line - 2].strip().startswith("#"):
                silent.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    assert not silent, "imports inside functions without a reason:\n" + "\n".join(silent)
