"""The shape of the code, as issue 21 measures it: lines, long functions, large modules, docs
size, the places that start or end an MLflow run, private third-party API sites, and the walk
from ``run_study`` through the project's own functions.

    python scripts/measure_structure.py [--long]

The walk follows ``run_study``'s ``config`` through the code: every call that passes it (or
something made from it) to a project function is a *move* into that function, followed once;
a move into another module is a *climb back up* (the reader must come back to where they were).
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("research", "analysis")

# Calls that start or end an MLflow run (the client's, and the project's own wrappers of them).
RUN_EDGES = re.compile(
    r"\.(create_run|set_terminated|end|finish|diverged|create_parent|start_trial_run)\(|"
    r"\b(start_run|mlflow\.start_run|mlflow\.end_run)\("
)
# Private attributes of Optuna objects used by the project.
PRIVATE = re.compile(
    r"\._storage\b|\._trial_id\b|\._backend\b|JournalFileBackend\)|JournalStorage\)|"
    r"\._cached_frozen_trial\b|optuna\.storages\._"
)


def python_files(folders=FOLDERS) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def long_functions(limit: int = 80) -> list[tuple[int, str]]:
    found = []
    for path in python_files():
        for node in functions(path):
            length = node.end_lineno - node.lineno + 1
            if length >= limit:
                found.append((length, f"{module_name(path)}.{node.name}"))
    return sorted(found, reverse=True)


def definitions() -> dict[str, dict[str, ast.AST]]:
    """module -> top-level function name -> node (methods as Class.name)."""
    found: dict[str, dict[str, ast.AST]] = {}
    for path in python_files():
        tree = ast.parse(path.read_text())
        names: dict[str, ast.AST] = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                names[node.name] = node
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        names[f"{node.name}.{item.name}"] = item
                        names.setdefault(item.name, item)  # methods, by their bare name
        found[module_name(path)] = names
    return found


def imported_names(module: str) -> dict[str, tuple[str, str]]:
    """name -> (module, name) for ``from research... import name`` anywhere in ``module``."""
    path = next(p for p in python_files() if module_name(p) == module)
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in FOLDERS:
                for alias in node.names:
                    found[alias.asname or alias.name] = (node.module, alias.name)
    return found


def _passes(node: ast.AST, names: set[str], variable: str = "config") -> bool:
    """Whether ``node`` is a tracked name, or the variable held by one (``request.config``)."""
    if isinstance(node, ast.Attribute) and node.attr == variable:
        node = node.value
    return isinstance(node, ast.Name) and node.id in names


def _callee(func: ast.AST, module: str, defs, imports) -> tuple[str, str] | None:
    """The project function a call's ``func`` names: a function of the module or one it
    imports, or a method (by its bare name) of the module or of a module it imports."""
    if isinstance(func, ast.Name):
        if func.id in defs[module]:
            return module, func.id
        if func.id in imports and imports[func.id][1] in defs.get(imports[func.id][0], {}):
            return imports[func.id]
        return None
    if isinstance(func, ast.Attribute):
        if func.attr in defs[module]:
            return module, func.attr
        for owner, _ in imports.values():
            if func.attr in defs.get(owner, {}):
                return owner, func.attr
    return None


def walk(start_module: str, start: str, variable: str = "config") -> tuple[int, int]:
    """Follows ``variable`` from ``start``: every call that passes it (or an expression made
    from it) to a project function is a move into that function, where the parameter that
    received it is followed in turn; a move into another module is a climb back up."""
    defs = definitions()
    seen: set[tuple[str, str]] = set()
    queued: set[tuple[str, str]] = set()
    moves = climbs = 0
    stack = [(start_module, start, {variable})]
    while stack:
        module, name, tracked = stack.pop()
        if (module, name) in seen:
            continue
        seen.add((module, name))
        node = defs.get(module, {}).get(name)
        if node is None:
            continue
        imports = imported_names(module)
        # aliases and holders of a tracked name are tracked too: ``config = request.config``,
        # ``request = StudyRequest(config, ...)`` (a class: a capitalised name)
        for statement in ast.walk(node):
            if not isinstance(statement, ast.Assign):
                continue
            value = statement.value
            holder = isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
            holder = holder and value.func.id[:1].isupper()
            if (_passes(value, tracked) or holder) and any(
                _passes(arg, tracked) for arg in getattr(value, "args", [value])
            ):
                for target in statement.targets:
                    tracked |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        for call in ast.walk(node):
            if not isinstance(call, ast.Call):
                continue
            target = _callee(call.func, module, defs, imports)
            if target is None:
                continue
            callee = defs[target[0]][target[1]]
            params = [a.arg for a in callee.args.args if a.arg not in ("self", "cls")]
            params += [a.arg for a in callee.args.kwonlyargs]
            received = {
                params[i]
                for i, arg in enumerate(call.args)
                if i < len(params) and _passes(arg, tracked)
            }
            received |= {k.arg for k in call.keywords if k.arg and _passes(k.value, tracked)}
            if isinstance(call.func, ast.Attribute) and _passes(call.func.value, tracked):
                received.add("self")  # a method of the tracked object
            if not received or target in seen or target in queued:
                continue
            queued.add(target)
            moves += 1
            climbs += target[0] != module
            stack.append((target[0], target[1], received))
    return moves, climbs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--long", action="store_true", help="list the long functions")
    args = parser.parse_args()
    files = python_files()
    lines = sum(len(p.read_text().splitlines()) for p in files)
    long = long_functions()
    large = sorted(
        (len(p.read_text().splitlines()), module_name(p))
        for p in files
        if len(p.read_text().splitlines()) >= 500
    )
    docs = sum(len(p.read_text()) for p in (REPO / "docs").rglob("*.md"))
    topic = {p.name: len(p.read_text()) for p in sorted((REPO / "docs").glob("*.md"))}
    run_sites = [
        f"{module_name(p)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if RUN_EDGES.search(line)
    ]
    private = [
        f"{module_name(p)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if PRIVATE.search(line) and not line.lstrip().startswith("#")
    ]
    compat = [s for s in private if s.split(":")[0].endswith("compat")]
    study_module = next(m for m in definitions() if "run_study" in definitions()[m])
    moves, climbs = walk(study_module, "run_study")
    print(f"non-test lines (research/, analysis/): {lines}")
    print(f"functions >= 80 lines: {len(long)}")
    if args.long:
        for length, name in long:
            print(f"    {length:4}  {name}")
    print(f"modules >= 500 lines: {len(large)} {[f'{m} {n}' for n, m in large]}")
    print(f"docs/ characters: {docs}; largest topic page: {max(topic.values())}")
    print(f"places that start or end an MLflow run: {len(run_sites)} {run_sites}")
    print(f"private Optuna API sites outside the compat module: {len(private) - len(compat)}")
    print(f"run_study walk: {moves} moves, {climbs} climbs back up")


if __name__ == "__main__":
    main()
