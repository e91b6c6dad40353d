"""The shape of the code, as issue 21 measures it: lines, long functions, large modules, docs
size, the places that start or end an MLflow run, private third-party API sites, and the walk
from ``run_study`` through the project's own functions.

    python scripts/measure_structure.py [--long]

The walk: from ``run_study``, every call to a project function (resolved through the module's
imports and its own definitions) is followed once, depth first. A *move* is one call followed; a
*climb back up* is a call into another module (the reader must come back to where they were).
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
    r"\b(start_training_run|mlflow\.start_run|mlflow\.end_run)\("
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


def walk(start_module: str, start: str) -> tuple[int, int]:
    defs = definitions()
    seen = {(start_module, start)}
    moves = climbs = 0
    stack = [(start_module, start)]
    while stack:
        module, name = stack.pop()
        node = defs.get(module, {}).get(name)
        if node is None:
            continue
        imports = imported_names(module)
        for call in ast.walk(node):
            if not isinstance(call, ast.Call):
                continue
            func = call.func
            target = None
            if isinstance(func, ast.Name):
                if func.id in defs[module]:
                    target = (module, func.id)
                elif func.id in imports and imports[func.id][0] in defs:
                    target = imports[func.id]
            elif isinstance(func, ast.Attribute):
                if func.attr in defs[module]:
                    target = (module, func.attr)
                else:  # a method of an imported class: the first module that defines it
                    owners = [m for m, _ in imports.values() if func.attr in defs.get(m, {})]
                    if owners:
                        target = (owners[0], func.attr)
            if target is None or target not in {(m, n) for m in defs for n in defs[m]}:
                continue
            if target in seen:
                continue
            seen.add(target)
            moves += 1
            climbs += target[0] != module
            stack.append(target)
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
    compat = [s for s in private if ".compat" in s]
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
