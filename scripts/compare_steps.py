"""Two versions of the engine's step side by side, in one process: w3's network
([784, 1024, 1024, 1024, 10], batch 256, float32, uint8 inputs) stepped by the ``research``
package of another checkout (before) and of this one (after), in interleaved rounds of a few
steps each, from the same parameters and masks. Prints each version's median step, the median of
the per-round ratios after/before, and whether the parameters ended bit for bit equal.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python scripts/compare_steps.py /tmp/before [plain|dropout|adam] [ROUNDS]

``dropout`` is w3-b256's step (dropout 0.2/0.5, max-norm 1.5, Nesterov 0.95); ``plain`` the same
without dropout and max-norm; ``adam`` the plain step with Adam 0.001.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODULES = ("research.engine.inplace", "research.engine.optim", "research.engine.mlp")


def load(root: Path, names: tuple[str, ...] = (*MODULES, "research.data")) -> dict[str, Any]:
    """The modules ``names`` of the ``research`` package of the checkout at ``root``, imported
    afresh (every ``research`` module imported before is forgotten first)."""
    for name in [m for m in sys.modules if m == "research" or m.startswith("research.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        modules = {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.pop(0)
    return modules


def stepper(modules: dict[str, Any], kind: str) -> tuple[Any, Any]:
    """A w3 stepper of ``kind`` and its dropout draw (None for none)."""
    mlp, optim = modules["research.engine.mlp"], modules["research.engine.optim"]
    spec = mlp.MLPSpec((784, 1024, 1024, 1024, 10), "relu", "softmax", "cross_entropy")
    params = mlp.init_params(spec, 0, np.float32, "he")
    optimizer = optim.adam(1e-3) if kind == "adam" else optim.momentum(0.01, 0.95, nesterov=True)
    step = modules["research.engine.inplace"].InPlaceTrainingStep(
        spec, params, optimizer, 256, max_norm=1.5 if kind == "dropout" else 0.0,
        pixel_values=modules["research.data"].pixel_values(False, np.float32),
    )  # fmt: skip
    rng = np.random.default_rng(1)

    def draw(rows: int) -> Any:
        return mlp.dropout_masks(rng, rows, spec.sizes, 0.2, 0.5, np.float32)

    return step, draw if kind == "dropout" else None


def main() -> None:
    before_root = Path(sys.argv[1])
    kind = sys.argv[2] if len(sys.argv) > 2 else "plain"
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    versions = {
        "before": stepper(load(before_root), kind),
        "after": stepper(load(Path(__file__).resolve().parents[1]), kind),
    }
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50_000, 784), dtype=np.uint8)
    targets = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 50_000)]
    order = rng.permutation(50_000)
    times: dict[str, list[float]] = {name: [] for name in versions}
    with np.errstate(over="ignore"):
        for round_number in range(rounds):
            for name, (step, draw) in versions.items():
                started = time.perf_counter()
                for k in range(5):
                    rows = order[((round_number * 5 + k) * 256) % 49_000 :][:256]
                    step.step(images, targets, rows, draw(256) if draw else None)
                times[name].append((time.perf_counter() - started) / 5)
    for name, values in times.items():
        print(f"{kind} {name}: median {1e3 * statistics.median(values):.2f} ms per step")
    ratios = [a / b for a, b in zip(times["after"], times["before"], strict=True)]
    same = all(
        np.array_equal(a[key], b[key])
        for a, b in zip(versions["before"][0].params, versions["after"][0].params, strict=True)
        for key in ("W", "b")
    )
    print(f"after / before per round: median {statistics.median(ratios):.3f}; "
          f"parameters bit for bit equal after {5 * rounds} steps: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
