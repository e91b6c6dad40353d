"""Where a step's time goes, stage by stage, in the engine and in JAX: ``python -m
research.bench.stages [--workload w3-plain] [--steps 20] [--rounds 5]``.

The engine's stages are timed inside its own step (:class:`InPlaceTrainingStep` with a timer
around each of its parts; the optimizer's update timed through a wrapper). XLA compiles JAX's step
into one program, so its stages are told apart by compiling three programs, each a ``lax.scan``
over the same batches as the bench's: the forward pass (gathering the batch, the dropout masks,
the loss), then that and the backward pass with a plain SGD update, then the whole step; a
stage's time is the difference between two programs. Rows: ``forward`` (input, masks, forward
pass, loss), ``backward`` (with plain SGD's update, which the engine does inside the products),
``optimizer`` (the rest of the update, max-norm's projection). Medians over interleaved rounds,
per step, float32. MLP workloads of the bench only (w1-epoch, w2-*, w3-*).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from research.bench.contenders import WORKLOADS, Workload, init_params
from research.engine.inplace import InPlaceTrainingStep


class _TimedStep(InPlaceTrainingStep):
    """The engine's step with the seconds of each of its parts added up in ``seconds``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = dict.fromkeys(("input", "forward", "backward", "optimizer"), 0.0)

    def _timed(self, stage: str, call: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        result = call(*args)
        self.seconds[stage] += time.perf_counter() - started
        return result

    def _gather(self, *args: Any) -> Any:
        return self._timed("input", super()._gather, *args)

    def _forward(self, *args: Any) -> Any:
        return self._timed("forward", super()._forward, *args)

    def _backward_and_update(self, *args: Any) -> None:
        self._timed("backward", super()._backward_and_update, *args)


#: ``run(batches)``: the seconds per step of each stage over ``batches`` (S, B) row indices.
StageRun = Callable[[np.ndarray], dict[str, float]]


def engine_stages(
    workload: Workload, images: np.ndarray, targets: np.ndarray, steps: int
) -> StageRun:
    """``run(batches) -> {stage: seconds}`` for ``steps`` engine steps over ``batches``."""
    from research.data import pixel_values
    from research.engine.mlp import dropout_masks
    from research.engine.optim import momentum, sgd

    spec, dtype = workload.spec, np.dtype(np.float32)
    optimizer = (
        momentum(workload.learning_rate, beta=workload.beta, nesterov=True)
        if workload.optimizer == "momentum"
        else sgd(workload.learning_rate)
    )
    stepper: _TimedStep
    if not optimizer.plain_gradient_step:  # (plain SGD updates inside the products: backward)
        update = optimizer.update_in_place

        def timed_update(*args: Any) -> None:
            stepper._timed("optimizer", update, *args)

        optimizer = dataclasses.replace(optimizer, update_in_place=timed_update)
    params = init_params(spec, 0, dtype, workload.init)
    table = pixel_values(False, dtype)
    stepper = _TimedStep(
        spec, params, optimizer, workload.batch_size, max_norm=workload.max_norm, pixel_values=table
    )
    mask_rng = np.random.default_rng(1)
    y = targets.astype(dtype)

    def run(batches: np.ndarray) -> dict[str, float]:
        stepper.seconds = dict.fromkeys(stepper.seconds, 0.0)
        masks_seconds = 0.0
        started = time.perf_counter()
        with np.errstate(over="ignore"):
            for rows in batches[:steps]:
                masks = None
                if workload.input_dropout or workload.dropout:
                    drawn = time.perf_counter()
                    masks = dropout_masks(
                        mask_rng, len(rows), spec.sizes, workload.input_dropout,
                        workload.dropout, dtype,
                    )  # fmt: skip
                    masks_seconds += time.perf_counter() - drawn
                stepper.step(images, y, rows, masks)
        total = time.perf_counter() - started
        seconds = dict(stepper.seconds)
        seconds["forward"] += seconds.pop("input") + masks_seconds
        # the loss, the output delta, max-norm's projection, the Python between the parts
        seconds["optimizer"] += total - sum(seconds.values())
        seconds["step"] = total
        return {stage: value / steps for stage, value in seconds.items()}

    return run


def jax_stages(workload: Workload, images: np.ndarray, targets: np.ndarray, steps: int) -> StageRun:
    """``run(batches) -> {stage: seconds}``: JAX's three programs over ``batches`` (see the
    module docstring)."""
    from research.bench import jax_programs
    from research.verify import reference

    jax, jnp = reference.jax, reference.jnp
    spec = workload.spec
    params = init_params(spec, 0, np.float32, workload.init)
    images_device, y_device = jax.device_put(images), jax.device_put(targets.astype(np.float32))
    rates = [workload.input_dropout, *[workload.dropout] * (spec.n_layers - 1)]
    objective = jax_programs._objective(spec)

    def draw(key: Any, rows: int) -> list[Any]:
        keys = jax.random.split(key, len(rates))
        return [
            None
            if rate == 0
            else jax.random.bernoulli(k, 1 - rate, (rows, w)).astype(jnp.float32) / (1 - rate)
            for k, w, rate in zip(keys, spec.sizes, rates)
        ]

    def forward(carry: Any, rows: Any) -> Any:
        p, key, total = carry
        key, sub = jax.random.split(key)
        x = jax_programs.batch_inputs(images_device, rows, jnp.float32)
        return (p, key, total + objective(p, x, y_device[rows], draw(sub, rows.shape[0]))), None

    def with_backward(carry: Any, rows: Any) -> Any:
        p, key, total = carry
        key, sub = jax.random.split(key)
        x = jax_programs.batch_inputs(images_device, rows, jnp.float32)
        value, grads = jax.value_and_grad(objective)(p, x, y_device[rows], draw(sub, rows.shape[0]))
        p = jax.tree.map(lambda a, g: a - workload.learning_rate * g, p, grads)
        return (p, key, total + value), None

    programs = {  # (parameters donated, as the bench's programs do: updated in place)
        name: jax.jit(
            lambda p, key, b, body=body: jax.lax.scan(body, (p, key, 0.0), b)[0],
            donate_argnums=0,
        )
        for name, body in (("forward", forward), ("backward", with_backward))
    }
    if workload.optimizer == "momentum":
        epoch = jax_programs.momentum_epoch(
            spec, workload.learning_rate, workload.beta, workload.input_dropout,
            workload.dropout, workload.max_norm,
        )  # fmt: skip
        step = jax_programs.momentum_epoch_runner(epoch, params, images, targets)
    else:
        step = jax_programs.sgd_epoch_runner(
            spec, workload.learning_rate, params, images, targets.astype(np.float32)
        )

    def run(batches: np.ndarray) -> dict[str, float]:
        rows = np.asarray(batches[:steps], np.int32)
        seconds = {}
        for name, program in programs.items():
            start = jax.device_put([dict(layer) for layer in params])  # a fresh copy to donate
            jax.block_until_ready(start)
            started = time.perf_counter()
            jax.block_until_ready(program(start, jax.random.key(0), rows))
            seconds[name] = time.perf_counter() - started
        started = time.perf_counter()
        step(rows)
        seconds["step"] = time.perf_counter() - started
        stages = {
            "forward": seconds["forward"],
            "backward": seconds["backward"] - seconds["forward"],
            "optimizer": seconds["step"] - seconds["backward"],
            "step": seconds["step"],
        }
        return {stage: value / steps for stage, value in stages.items()}

    return run


def profile(
    key: str,
    steps: int,
    rounds: int,
    say: Callable[[str], None] = print,
    source_dir: str | None = None,
    data_dir: str | None = None,
) -> str:
    """The table of :func:`engine_stages` against :func:`jax_stages` for workload ``key``, on
    MNIST's training rows (``source_dir``, ``data_dir`` as for ``load_mnist``)."""
    from research.data import load_mnist

    (workload,) = [w for w in WORKLOADS if w.key == key]
    data = load_mnist(source_dir, data_dir)
    images = data.train.images
    targets = np.eye(10, dtype=np.float32)[data.train.labels]
    rng = np.random.default_rng(0)
    runs = {
        "engine-f32": engine_stages(workload, images, targets, steps),
        "jax-f32": jax_stages(workload, images, targets, steps),
    }
    times: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for round_number in range(rounds + 1):  # the first round warms up (and compiles)
        say(f"{key}: round {round_number}/{rounds}" + (" (warm-up)" if not round_number else ""))
        batches = rng.permutation(len(images))[: steps * workload.batch_size]
        for name, run in runs.items():
            time.sleep(0.3)  # (OpenBLAS's threads go to sleep: research/bench/run.py)
            result = run(batches.reshape(steps, workload.batch_size))
            if round_number:
                times[name].append(result)
    lines = [f"{key}: per step, median of {rounds} rounds of {steps} steps"]
    lines.append(f"{'stage':<10} {'engine-f32':>11} {'jax-f32':>9}")
    for stage in ("forward", "backward", "optimizer", "step"):
        cells = [statistics.median(r[stage] for r in times[name]) * 1e3 for name in runs]
        lines.append(f"{stage:<10} {cells[0]:>8.2f} ms {cells[1]:>6.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m research.bench.stages", description=__doc__.split("\n\n")[0]
    )
    keys = [w.key for w in WORKLOADS if not w.layers and w.steps]
    parser.add_argument("--workload", choices=keys, default="w3-plain")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--source-dir", help="MNIST's IDX files (as for bench)")
    parser.add_argument("--data-dir", help="the prepared dataset's folder (as for bench)")
    args = parser.parse_args(argv)
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} is not allowed; give an integer >= 1")
    print(profile(args.workload, args.steps, args.rounds, print, args.source_dir, args.data_dir))


if __name__ == "__main__":
    main()
