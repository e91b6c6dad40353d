"""Before and after uint8 inputs, in one run: a ``w1`` epoch (the origin's network
[784, 30, 10], sigmoid, squared error, SGD 0.01, batch 256, 195 steps over 50,000 shuffled rows)
trained from float32 inputs (before) and from uint8 images converted per batch (after), on the
engine (``train_epoch`` over an ``InPlaceTrainingStep``) and on JAX (``reference.sgd_epoch`` on
float32 inputs; the bench's ``jax_programs.sgd_epoch`` on uint8 images), beside the origin's
per-sample port. Interleaved rounds,
median and spread per contender, ratios against the engine on uint8. One process, one BLAS pool
of the machine's cores: ``python -m research bench`` (separate worker processes) gives the
table in docs/performance.md; this script answers "what did uint8 change" on its own.

    .venv/bin/python scripts/measure_uint8_inputs.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research.engine.blas_kernels import choose_openblas_kernels

choose_openblas_kernels()  # as `python -m research` does, before numpy loads OpenBLAS

import numpy as np  # noqa: E402

from research.bench.contenders import ORIGIN_SPEC as SMALL_SPEC  # noqa: E402
from research.data import load_mnist, pixel_values  # noqa: E402
from research.engine.inplace import InPlaceTrainingStep  # noqa: E402
from research.engine.mlp import init_params  # noqa: E402
from research.engine.optim import sgd  # noqa: E402
from research.experiment.training.train import train_epoch  # noqa: E402

BATCH, STEPS, LEARNING_RATE = 256, 195, 0.01


def engine(x: np.ndarray, targets: np.ndarray, uint8: bool):
    params = init_params(SMALL_SPEC, 0, np.float32, "normal")
    table = pixel_values(False, np.float32) if uint8 else None
    stepper = InPlaceTrainingStep(SMALL_SPEC, params, sgd(LEARNING_RATE), BATCH, pixel_values=table)
    rng = np.random.default_rng(0)

    def run() -> None:
        with np.errstate(over="ignore"):
            train_epoch(stepper, x, targets, rng.permutation(len(x)), STEPS)

    return run


def origin(x: np.ndarray, targets: np.ndarray):
    """The origin program's per-sample port (float64, float inputs: it has no uint8 path)."""
    from research.verify.origin import origin_update_mini_batch

    state = {"params": init_params(SMALL_SPEC, 0, np.float64, "normal")}
    x, targets = x.astype(np.float64), targets.astype(np.float64)
    rng = np.random.default_rng(0)

    def run() -> None:
        order = rng.permutation(len(x))[: STEPS * BATCH].reshape(STEPS, BATCH)
        for rows in order:
            state["params"], _ = origin_update_mini_batch(
                state["params"], x[rows], targets[rows], LEARNING_RATE
            )

    return run


def jax_epoch(x: np.ndarray, targets: np.ndarray, uint8: bool):
    import jax
    import jax.numpy as jnp

    from research.bench import jax_programs
    from research.verify import reference

    epoch = (jax_programs.sgd_epoch if uint8 else reference.sgd_epoch)(SMALL_SPEC, LEARNING_RATE)
    params = init_params(SMALL_SPEC, 0, np.float32, "normal")
    state = {"params": [{k: jnp.asarray(v) for k, v in layer.items()} for layer in params]}
    x_device, y_device = jax.device_put(x), jax.device_put(targets)
    rng = np.random.default_rng(0)

    def run() -> None:
        batches = rng.permutation(len(x))[: STEPS * BATCH].reshape(STEPS, BATCH).astype(np.int32)
        state["params"], losses = epoch(state["params"], x_device, y_device, batches)
        jax.block_until_ready((state["params"], losses))

    return run


def main(rounds: int = 9) -> None:
    data = load_mnist()
    images = np.ascontiguousarray(data.train.images)
    x = data.train.x
    targets = np.eye(10, dtype=np.float32)[data.train.labels]
    contenders = {
        "origin (per-sample port, float64)": origin(x, targets),
        "engine-f32, float32 inputs (before)": engine(x, targets, uint8=False),
        "engine-f32, uint8 inputs (after)": engine(images, targets, uint8=True),
        "jax-f32, float32 inputs (before)": jax_epoch(x, targets, uint8=False),
        "jax-f32, uint8 inputs (after)": jax_epoch(images, targets, uint8=True),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for run in contenders.values():  # warm-up (JAX compiles)
        run()
    for number in range(rounds):
        for name, run in contenders.items():
            # OpenBLAS's threads spin-wait ~0.1 s after a call and would take the cores from
            # XLA's: let them sleep first, as the bench does (docs/performance.md)
            time.sleep(0.3)
            started = time.perf_counter()
            run()
            times[name].append(1000 * (time.perf_counter() - started))
        print(f"round {number + 1}/{rounds}", file=sys.stderr, flush=True)
    after = statistics.median(times["engine-f32, uint8 inputs (after)"])
    print(f"w1 epoch (195 steps of 256 rows), {rounds} interleaved rounds, median [min, max]:")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"  {name:<38} {median:7.1f} ms  [{min(values):6.1f}, {max(values):6.1f}]  "
            f"{median / after:5.2f}x the engine on uint8"
        )
    before = statistics.median(times["engine-f32, float32 inputs (before)"])
    jax_before = statistics.median(times["jax-f32, float32 inputs (before)"])
    jax_after = statistics.median(times["jax-f32, uint8 inputs (after)"])
    slowest = statistics.median(times["origin (per-sample port, float64)"])
    print(
        f"engine speed-up over JAX: before {jax_before / before:.2f}x, "
        f"after {jax_after / after:.2f}x; over the origin: before {slowest / before:.1f}x, "
        f"after {slowest / after:.1f}x"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
