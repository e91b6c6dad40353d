"""Rules of the house: light imports, jax only in the reference, no TensorFlow anywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return set(result.stdout.split())


def test_importing_the_library_stays_light():
    modules = imported_after(
        "import research, research.mlp, research.optim, research.train, research.data, "
        "research.tracking, research.gradcheck, research.origin, research.cli"
    )
    heavy = {"jax", "mlflow", "optuna", "tensorflow_datasets", "tensorflow", "torch", "matplotlib"}
    assert not heavy & {name.split(".")[0] for name in modules}


def test_loading_mnist_never_imports_tensorflow(tmp_path):
    modules = imported_after(
        "from research.data import load_mnist\n"
        f"load_mnist(data_dir={str(tmp_path)!r})\n"
        "import tensorflow_datasets"
    )
    assert "tensorflow_datasets" in modules
    assert "tensorflow" not in modules


def test_only_the_reference_imports_jax():
    sources = {path.name: path.read_text() for path in (REPO / "research").glob("*.py")}
    importing = {
        name for name, text in sources.items() if "import jax" in text or "from jax" in text
    }
    assert importing == {"reference.py"}
    importing_mlflow = {
        name for name, text in sources.items() if "import mlflow" in text or "from mlflow" in text
    }
    assert importing_mlflow == {"tracking.py"}


def test_analysis_reads_results_and_never_trains():
    sources = {path.name: path.read_text() for path in (REPO / "analysis").glob("*.py")}
    assert {"report.py", "store.py", "style.py", "render.py"} <= set(sources)
    for name, text in sources.items():
        assert "import mlflow" not in text and "from mlflow" not in text, name
        assert "import jax" not in text and "from jax" not in text, name
        # Training entry points: train(), the study's objective and its final refit.
        for call in ("train(", "optimize(", "final_fit(", "run_study(", "loss_and_grads("):
            assert call not in text, (name, call)
        for line in text.splitlines():
            if line.strip().startswith(("from research", "import research")):
                imported = line.split()[1]
                assert imported in {
                    "research",
                    "research.data",
                    "research.mlp",
                    "research.study",
                    "research.train",
                    "research.tracking",
                }, line
    # The report takes from training only the presets (the origin's configuration, to compare).
    assert "from research.train import PRESETS" in sources["report.py"]


def test_importing_the_analysis_stays_light():
    modules = imported_after("import analysis, analysis.store, analysis.report")
    assert not {"jax", "optuna", "torch", "tensorflow_datasets"} & {
        name.split(".")[0] for name in modules
    }
