"""Rules of the house: folders that show the floors, imports that only run down them, no circles,
light imports with no side effects, jax only in the reference, MLflow only in tracking."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from test_blas_kernels import probe

REPO = Path(__file__).resolve().parents[1]

# Each package of the library and its floor: a module may import from its own floor and the
# floors below it, never from above. research/experiment/ has floors of its own (config, then
# training, then tracking, then studies and reproduction side by side), numbered 2.x.
FLOORS = {
    "research.engine": 0,
    "research.data": 0,
    "research.verify": 1,
    "research.experiment.config": 2.0,
    "research.experiment.training": 2.1,
    "research.experiment.tracking": 2.2,
    "research.experiment.studies": 2.3,
    "research.experiment.reproduction": 2.3,
    "analysis": 3,
    "research.bench": 4,
    "research.arguments": 4,
    "research.cli": 4,
    "research.__main__": 4,
}
# What each folder of research/experiment/ holds: a new module must find its floor.
EXPERIMENT_FOLDERS = {"config", "training", "tracking", "studies", "reproduction"}
# What analysis/ may read: results, the field table, the engine and the data; never the
# training loop, the study runner or the command line.
ANALYSIS_MAY_IMPORT = (
    "research.engine.",
    "research.data",
    "research.experiment.config.fields",
    "research.experiment.config.presets",
    "research.experiment.training.stats",
    "research.experiment.studies.storage",
    "research.experiment.tracking",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    module_name(path): path
    for folder in ("research", "analysis")
    for path in sorted((REPO / folder).rglob("*.py"))
}


def imports_of(path: Path) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from research.data import mnist` imports the module research.data.mnist
            names = [node.module]
            names += [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def floor(module: str) -> float | None:
    for package, level in FLOORS.items():
        if module == package or module.startswith(package + "."):
            return level
    return None  # the `research` and `research.experiment` packages themselves: docstrings


def test_the_folders_show_the_floors():
    top = {path.name for path in (REPO / "research").iterdir() if not path.name.startswith(".")}
    top.discard("__pycache__")
    assert top == {
        "__init__.py", "__main__.py", "cli.py", "arguments.py", "bench",
        "engine", "data", "verify", "experiment",
    }  # fmt: skip
    experiment = REPO / "research" / "experiment"
    inside = {path.name for path in experiment.iterdir() if not path.name.startswith((".", "_"))}
    assert inside == EXPERIMENT_FOLDERS, "research/experiment/ holds only its floors' folders"
    for module in MODULES:
        top_level = ("research", "analysis", "research.experiment")
        assert module in top_level or floor(module) is not None, module


def test_no_import_runs_up_a_floor():
    upward = [
        (module, imported)
        for module, imported_modules in GRAPH.items()
        for imported in imported_modules
        if floor(module) is not None
        and floor(imported) is not None
        and floor(imported) > floor(module)  # type: ignore[operator]
    ]
    assert upward == []
    # floors side by side do not import each other: studies and reproduction are apart
    apart = ("research.experiment.studies", "research.experiment.reproduction")
    across = [
        (module, imported)
        for module, imported_modules in GRAPH.items()
        for imported in imported_modules
        for here, there in (apart, apart[::-1])
        if module.startswith(here) and imported.startswith(there)
    ]
    assert across == []
    # the ground floors import nothing of the project outside themselves
    for module, imported_modules in GRAPH.items():
        if module.startswith("research.engine"):
            assert all(m.startswith("research.engine") for m in imported_modules), module
        if module.startswith("research.data"):
            assert all(m.startswith("research.data") for m in imported_modules), module


def test_there_are_no_circles():
    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            module, path = stack.pop()
            for imported in GRAPH[module]:
                if imported == start:
                    return [*path, start]
                if imported not in path:
                    stack.append((imported, [*path, imported]))
        return None

    # a package importing its own modules (research.data re-exporting mnist) is not a circle
    for module in GRAPH:
        GRAPH[module] = {m for m in GRAPH[module] if not module.startswith(m + ".")}
    circles = [cycle for module in GRAPH if (cycle := cycle_from(module))]
    assert circles == []


def test_analysis_reads_results_and_never_trains():
    for module, imported_modules in GRAPH.items():
        if module.startswith("analysis"):
            for imported in imported_modules:
                if imported.startswith("research"):
                    assert imported.startswith(ANALYSIS_MAY_IMPORT), (module, imported)


def third_party_imports(library: str) -> set[str]:
    importing = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name == library or name.startswith(library + ".") for name in names):
                importing.add(module)
    return importing


#: The independent JAX references of the built-in layers (research/verify/layer_refs/).
LAYER_REFS = ("dense", "conv", "pooling", "norm", "residual")


def test_each_heavy_library_lives_in_the_rooms_that_use_it():
    assert third_party_imports("jax") == {
        "research.verify.reference",
        "research.verify.layer_check",
        *{f"research.verify.layer_refs.{name}" for name in LAYER_REFS},
    }
    assert third_party_imports("mlflow") == {
        "research.experiment.tracking.stores",
        "research.experiment.tracking.runs",
        "research.experiment.tracking.results",
        "research.experiment.tracking.models",
        "research.experiment.tracking.pending_models",
        "research.experiment.tracking.inputs",
        "research.experiment.tracking.mlp_pyfunc",
    }
    assert third_party_imports("optuna") == {
        "research.experiment.studies.storage",
        "research.experiment.studies.trials",
        "research.experiment.studies.liveness",
        "research.experiment.studies.study",
        "research.experiment.studies.optuna_compat",
        "research.experiment.studies.optuna_study",
        "analysis.report",
    }
    assert third_party_imports("tensorflow_datasets") == {"research.data.idx"}


def imported_after(code: str, first: str = "") -> tuple[set[str], bool]:
    """The modules a fresh interpreter holds after ``code``, and whether ``code`` left its
    environment unchanged (``first`` runs before that is noted)."""
    probe = (
        f"{first}\nimport os\nbefore = dict(os.environ)\n"
        f"{code}\nimport sys\n"
        "print(dict(os.environ) == before)\nprint(' '.join(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    unchanged, modules = result.stdout.splitlines()
    return set(modules.split()), unchanged == "True"


def test_importing_the_library_is_light_and_changes_nothing():
    # jax sets variables of its own when imported (TF_CPP_MIN_LOG_LEVEL, ...): not ours to judge
    modules, unchanged = imported_after("import " + ", ".join(MODULES), first="import jax")
    assert unchanged, "importing the library changed the environment"
    heavy = {"jax", "mlflow", "optuna", "tensorflow_datasets", "tensorflow", "torch"}
    # importing every module (the reference included) loads jax; nothing else heavy at import
    assert heavy & {name.split(".")[0] for name in modules} == {"jax"}
    modules, _ = imported_after(
        "import research, research.engine.mlp, research.engine.optim, research.data, "
        "research.experiment.training.train, research.experiment.tracking.runs, "
        "research.verify.gradcheck, research.verify.origin, "
        "research.experiment.config.study_config, research.cli"
    )
    heavy.add("matplotlib")
    assert not heavy & {name.split(".")[0] for name in modules}


def test_loading_mnist_never_imports_tensorflow_and_a_warm_load_not_even_tfds(
    tmp_path, mnist_folder
):
    load = (
        "from research.data import load_mnist\n"
        f"load_mnist({str(mnist_folder)!r}, data_dir={str(tmp_path)!r})\n"
    )
    modules, _ = imported_after(load + "import tensorflow_datasets")  # tfds prepares the cache
    assert "tensorflow_datasets" in modules
    assert "tensorflow" not in modules
    modules, _ = imported_after(load)  # the prepared cache is read without tfds
    assert "tensorflow_datasets" not in modules


def test_importing_the_library_leaves_numpy_its_own_blas_kernels():
    """``python -m research`` chooses numpy's OpenBLAS kernels at its entry (before numpy loads:
    research.engine.blas_kernels); an import of the library chooses nothing."""
    found = probe("import research, research.engine.mlp, research.experiment.config.fields")
    assert found["variable"] is None
    assert found["kernels"] == probe("import numpy")["kernels"]


def test_importing_the_analysis_stays_light():
    modules, _ = imported_after("import analysis, analysis.store, analysis.report")
    assert not {"jax", "optuna", "torch", "tensorflow_datasets"} & {
        name.split(".")[0] for name in modules
    }


def test_the_readme_api_example_runs():
    """The model API example of the README, as printed there (on random data)."""
    readme = (REPO / "README.md").read_text()
    example = readme.split("## The model API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    setup = "import numpy as np\nrng = np.random.default_rng(0)\n"
    setup += "x = rng.random((8, 784))\ny = np.eye(10)[rng.integers(0, 10, 8)]\n"
    namespace: dict = {}
    exec(compile(setup + example, "README.md", "exec"), namespace)
    assert namespace["probabilities"].shape == (8, 10)
