"""A bench workload's engine-f32 run, two versions of the engine side by side in one process:
the ``research`` package of another checkout (before) and of this one (after), each preparing the
workload as ``python -m research bench`` does, timed in interleaved rounds. Prints each version's
median run and the median (min–max) of the per-round ratios after/before.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python scripts/compare_workloads.py /tmp/before w1-epoch [ROUNDS]

Within one process both versions share the process's luck (a fresh process's speed on a noisy
machine is set at its start, docs/measurements/2026-12-06-elementwise-second-pass.md), so small
changes show here that separate bench runs drown. For w3's step with a bit-for-bit check of the
parameters, see ``scripts/compare_steps.py``.

Each version's modules are imported while it prepares; a version that imported a module of its
own lazily inside a timed run would get the other's. The process is not set up as ``python -m
research`` sets up the bench's workers (glibc's ``mallopt`` thresholds), for both versions alike.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from compare_steps import load  # (this folder is on the path of a script run from it)


def main() -> None:
    before_root, key = Path(sys.argv[1]), sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    runs = {}
    for label, root in (("before", before_root), ("after", Path(__file__).resolve().parents[1])):
        contenders = load(root, ("research.bench.contenders",))["research.bench.contenders"]
        workload = next(w for w in contenders.WORKLOADS if w.key == key)
        contender = contenders._make_contender("engine-f32", contenders._Data(None, None))
        runs[label] = contender.prepare(workload, workload.steps)
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, run in runs.items():
            started = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - started)
    for label, values in times.items():
        print(f"{key} {label}: median {1e3 * statistics.median(values):.2f} ms per run")
    ratios = [a / b for a, b in zip(times["after"], times["before"], strict=True)]
    print(f"after / before per round: median {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
