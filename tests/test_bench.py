"""``python -m research bench --quick``: it runs, prints a well-formed table and logs a well-formed
MLflow run. No timing is asserted (machines are noisy); only that every figure exists and is sane.
And w3's JAX program computes the engine's step (dropout, max-norm, Nesterov momentum).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_close

from research.bench import stages
from research.bench.contenders import CONTENDERS, ORIGIN_SPEC, WORKLOADS
from research.bench.memory_traffic import copy_bandwidth, elementwise_bytes
from research.bench.run import timing_groups, torch_available
from research.cli import main
from research.data import to_inputs
from research.engine.blas_kernels import VARIABLE, loaded_kernels
from research.engine.inplace import InPlaceTrainingStep
from research.engine.mlp import MLPSpec, dropout_masks, init_params
from research.engine.optim import momentum
from research.verify.compare import tolerance


@pytest.mark.slow
def test_quick_bench_prints_table_writes_json_and_logs_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    json_path = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "research", "bench", "--quick", "--json", str(json_path),
         "--tracking-uri", store],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout

    expected_rows = {
        (workload.key, name)
        for workload in WORKLOADS
        for name in workload.contenders
        if name != "torch-f32" or torch_available()
    }
    table_rows = {tuple(line.split()[:2]) for line in out.splitlines()}
    assert expected_rows <= table_rows
    assert "matrix-product peak: float32" in out and "peak memory (w2-b256" in out
    # w3: dropout + max-norm against the plain step, per contender, from the same rounds
    (ratio_line,) = [line for line in out.splitlines() if line.startswith("w3-b256 / w3-plain")]
    assert "engine-f32" in ratio_line and "jax-f32" in ratio_line
    # w4: what an epoch of its network takes, from the median step
    assert any(line.startswith("w4-b64: an epoch of 50,000 rows = 781 steps") and "jax-f32" in line
               for line in out.splitlines())  # fmt: skip
    if not torch_available():
        assert "PyTorch is not installed" in result.stderr
        assert not any(row[1:2] == ("torch-f32",) for row in table_rows)

    results = json.loads(json_path.read_text())
    assert results["quick"] is True and results["rounds"] == 2
    assert results["peak_gflops"]["float32"] > 0 and results["peak_gflops"]["float64"] > 0
    assert "blas" in results["libraries"] and "jax" in results["libraries"]
    for workload in WORKLOADS:
        rows = results["workloads"][workload.key]["contenders"]
        assert {(workload.key, name) for name in rows} <= expected_rows
        for name, row in rows.items():
            seconds = row["seconds"]
            assert 0 < seconds["min"] <= seconds["median"] <= seconds["max"] < math.inf, name
            assert row["gflops"] > 0 and 0 < row["fraction_of_peak"] < math.inf
            ratio = row["engine_speedup"]
            assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
        assert rows["engine-f32"]["engine_speedup"]["median"] == 1.0
        if workload.baseline:
            assert results["workloads"][workload.key]["baseline"] == workload.baseline
            for name in ("engine-f32", "jax-f32"):
                ratio = rows[name]["baseline_ratio"]
                assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"] < math.inf
    assert set(results["workloads"]) == {w.key for w in WORKLOADS}
    assert 0 < results["memory"]["peak_bytes"]
    assert results["memory"]["budget_bytes"] > 0
    # the elementwise traffic of every MLP training workload against a copy's bandwidth
    traffic = results["memory_traffic"]
    assert set(traffic) == {"w1-epoch", "w2-b256", "w2-b1024", "w3-b256", "w3-plain"}
    for key, row in traffic.items():
        assert row["total_bytes"] == pytest.approx(sum(row["bytes"].values()))
        assert row["bandwidth"] > 0 and row["engine_step_seconds"] > 0
        assert row["seconds_at_bandwidth"] == pytest.approx(row["total_bytes"] / row["bandwidth"])
        (line,) = [line for line in out.splitlines() if line.startswith(f"  {key}: ")]
        assert "GB/s" in line and "% of its" in line

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("benchmarks")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id in out
    params = run.data.params
    assert {"cpu", "cores", "numpy", "blas", "blas_threads", "jax", "quick"} <= set(params)
    assert params["blas_kernels"] == loaded_kernels()
    assert params["openblas_coretype"] == os.environ.get(VARIABLE, "(unset)")
    assert params["quick"] == "True"
    metrics = run.data.metrics
    assert metrics["peak_gflops/float32"] == pytest.approx(results["peak_gflops"]["float32"])
    assert metrics["w1-epoch/engine-f32/seconds_median"] == pytest.approx(
        results["workloads"]["w1-epoch"]["contenders"]["engine-f32"]["seconds"]["median"]
    )
    assert "w2-b256/jax-f32/engine_speedup_median" in metrics
    assert "w3-b256/jax-f32/engine_speedup_median" in metrics
    assert "w3-b256/engine-f32/baseline_ratio_median" in metrics
    assert "w4-b64/jax-f32/engine_speedup_median" in metrics
    assert "memory/ratio_to_budget" in metrics
    assert metrics["w3-plain/engine-f32/elementwise_bytes"] == traffic["w3-plain"]["total_bytes"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"bench_table.txt", "bench_results.json"}


def test_contender_names_are_the_documented_ones():
    assert set(CONTENDERS) == {"origin", "engine-f64", "engine-f32", "jax-f32", "torch-f32"}
    assert {w.key for w in WORKLOADS} == {
        "w1-epoch", "w1-eval", "w2-b256", "w2-b1024", "w3-b256", "w3-plain", "w4-b64",
    }  # fmt: skip


def test_w3_is_timed_with_its_plain_step_and_differs_from_it_only_in_regularization():
    w3, plain = (next(w for w in WORKLOADS if w.key == key) for key in ("w3-b256", "w3-plain"))
    assert [[w.key for w in group] for group in timing_groups(WORKLOADS)] == [
        ["w1-epoch"], ["w1-eval"], ["w2-b256"], ["w2-b1024"], ["w3-b256", "w3-plain"],
        ["w4-b64"],
    ]  # fmt: skip
    assert w3.spec.sizes == (784, 1024, 1024, 1024, 10) and w3.baseline == "w3-plain"
    assert (w3.input_dropout, w3.dropout, w3.max_norm) == (0.2, 0.5, 1.5)
    assert (w3.optimizer, w3.beta, w3.batch_size) == ("momentum", 0.95, 256)
    assert (plain.input_dropout, plain.dropout, plain.max_norm, plain.baseline) == (0, 0, 0, "")
    same = ("spec", "init", "batch_size", "learning_rate", "steps", "quick_steps", "optimizer")
    assert all(getattr(w3, field) == getattr(plain, field) for field in same)
    assert {"engine-f32", "jax-f32"} <= set(w3.contenders) & set(plain.contenders)


def test_w3_jax_step_is_the_engine_step_for_the_same_masks():
    """Two steps of w3 in float64 with the same explicit dropout masks: the JAX program's step
    (jitted as in the benchmark's scan) against the engine's in-place step, with a max-norm
    radius that projects about half of the first layer's units."""
    import jax
    import jax.numpy as jnp

    from research.bench.jax_programs import momentum_step

    w3 = next(w for w in WORKLOADS if w.key == "w3-b256")
    spec, batch = w3.spec, 16
    params = init_params(spec, 0, np.float64, w3.init)
    radius = float(np.median(np.linalg.norm(params[0]["W"], axis=0)))
    optimizer = momentum(w3.learning_rate, beta=w3.beta, nesterov=True)
    stepper = InPlaceTrainingStep(spec, params, optimizer, batch, max_norm=radius)
    step = jax.jit(momentum_step(spec, w3.learning_rate, w3.beta, radius))
    jax_params = [{k: jnp.asarray(v) for k, v in layer.items()} for layer in params]
    velocity = [{k: jnp.zeros_like(v) for k, v in layer.items()} for layer in jax_params]
    rng = np.random.default_rng(0)
    for number in range(2):
        x = rng.random((batch, spec.sizes[0]))
        y = np.eye(spec.sizes[-1])[rng.integers(0, spec.sizes[-1], batch)]
        masks = dropout_masks(rng, batch, spec.sizes, w3.input_dropout, w3.dropout, np.float64)
        loss = stepper.step(x, y, masks=masks)
        jax_params, velocity, jax_loss = step(jax_params, velocity, x, y, masks)
        assert_close(float(jax_loss), loss, "loss", f"loss of step {number + 1}")
        # a step moves the parameters by the gradients' rate-scaled error at most
        assert_close(jax_params, stepper.params, "gradients", f"params after step {number + 1}")
    norms = np.linalg.norm(stepper.params[0]["W"], axis=0)
    same = tolerance("same_operations", np.float64)
    at_radius = np.isclose(norms, radius, rtol=same.rtol, atol=same.atol)
    assert 0.2 < np.mean(at_radius) < 0.8  # the projection acted


def test_w4_jax_step_is_the_engine_step():
    """Two SGD steps of w4's network in float64 from the same parameters: the JAX program's step
    (lax.conv_general_dilated, lax.reduce_window; jitted as in the benchmark) against the engine's
    network.loss_and_grads and sgd's update_in_place."""
    import jax
    import jax.numpy as jnp

    from research.bench.conv_workload import network_of
    from research.bench.jax_programs import conv_net_step
    from research.engine.network import init_params as network_params
    from research.engine.network import loss_and_grads
    from research.engine.optim import sgd

    w4 = next(w for w in WORKLOADS if w.key == "w4-b64")
    network = network_of(w4)
    assert network.describe() == (
        "conv(20,5) relu maxpool(2) conv(40,5) relu maxpool(2) dense(100) relu dense(10)"
    )
    params = network_params(network, 0, np.float64)
    optimizer = sgd(w4.learning_rate)
    state = optimizer.init(params)
    step = jax.jit(conv_net_step(w4.learning_rate, 2, network.in_shape))
    jax_params = [{k: jnp.asarray(v) for k, v in layer.items()} for layer in params if layer]
    rng = np.random.default_rng(0)
    for number in range(2):
        x = rng.random((16, 784))
        y = np.eye(10)[rng.integers(0, 10, 16)]
        loss, grads, _ = loss_and_grads(network, params, x, y)
        optimizer.update_in_place(params, grads, state)
        jax_params, jax_loss = step(jax_params, x, y)
        assert_close(float(jax_loss), loss, "loss", f"loss of step {number + 1}")
        ours = [layer for layer in params if layer]
        assert_close(jax_params, ours, "gradients", f"params after step {number + 1}")


def test_w4_matmul_flops_count_the_convolutions_as_their_products():
    w4 = next(w for w in WORKLOADS if w.key == "w4-b64")
    # per example: conv1 1·25·20·24², conv2 20·25·40·8², dense 640·100, 100·10
    products = [288_000, 1_280_000, 64_000, 1_000]
    assert w4.matmul_flops() == 2 * 64 * (2 * sum(products) + sum(products[1:]))


SMALL_SPECS = {
    "w1": ORIGIN_SPEC,
    "relu": MLPSpec((784, 32, 16, 10), "relu", "softmax", "cross_entropy"),
}


def jax_tree(params):
    import jax.numpy as jnp

    return [{key: jnp.asarray(value) for key, value in layer.items()} for layer in params]


@pytest.mark.parametrize("name", list(SMALL_SPECS))
def test_jax_sgd_program_on_images_is_the_reference_program_on_floats(mnist, name):
    """The JAX contender of w1 and w2 gathers uint8 rows and converts them inside its program:
    the same epoch as ``reference.sgd_epoch`` (its program before) on ``Split.x``, but for the
    last bit of the inputs (XLA divides by 255 as a product with 1/255)."""
    from research.bench.jax_programs import batch_inputs, sgd_epoch
    from research.verify import reference

    spec = SMALL_SPECS[name]
    images, labels = mnist.train.images[:1_000], mnist.train.labels[:1_000]
    floats = to_inputs(images)
    targets = np.eye(10, dtype=np.float32)[labels]
    params = init_params(spec, 0, np.float32, "xavier")
    batches = np.random.default_rng(0).permutation(1_000)[: 6 * 64].reshape(6, 64)
    batches = batches.astype(np.int32)
    np.testing.assert_array_max_ulp(
        np.asarray(batch_inputs(images, batches[0], np.float32)), floats[batches[0]], maxulp=1
    )
    ours, our_losses = sgd_epoch(spec, 0.1)(jax_tree(params), images, targets, batches)
    theirs, their_losses = reference.sgd_epoch(spec, 0.1)(
        jax_tree(params), floats, targets, batches
    )
    assert_close(np.asarray(our_losses), np.asarray(their_losses), "inputs_last_bit", "losses")
    assert_close(ours, theirs, "inputs_last_bit", "params after an epoch")


def test_jax_momentum_program_on_images_steps_as_its_step_on_floats(mnist):
    """w3's JAX epoch (without dropout and max-norm, so no random draws) on uint8 images: the
    steps of ``momentum_step`` on the float inputs, but for the last bit of the inputs."""
    import jax

    from research.bench.jax_programs import momentum_epoch, momentum_step

    spec = SMALL_SPECS["relu"]
    images, labels = mnist.train.images[:1_000], mnist.train.labels[:1_000]
    floats = to_inputs(images)
    targets = np.eye(10, dtype=np.float32)[labels]
    params = init_params(spec, 0, np.float32, "he")
    batches = np.random.default_rng(1).permutation(1_000)[: 5 * 50].reshape(5, 50)
    batches = batches.astype(np.int32)
    epoch = momentum_epoch(spec, 0.05, 0.9, 0.0, 0.0, 0.0)
    zeros = [{key: np.zeros_like(v) for key, v in layer.items()} for layer in params]
    ours, _, _, our_losses = epoch(
        jax_tree(params), jax_tree(zeros), jax.random.key(0), images, targets, batches
    )
    step = jax.jit(momentum_step(spec, 0.05, 0.9, 0.0))
    theirs, velocity, no_masks = jax_tree(params), jax_tree(zeros), [None] * spec.n_layers
    for number, rows in enumerate(batches):
        theirs, velocity, loss = step(theirs, velocity, floats[rows], targets[rows], no_masks)
        assert_close(our_losses[number], loss, "inputs_last_bit", f"loss of step {number + 1}")
    assert_close(ours, theirs, "inputs_last_bit", "params after an epoch")


def test_matmul_flops_count_forward_weight_gradients_and_inner_deltas():
    w2 = next(w for w in WORKLOADS if w.key == "w2-b256")
    pairs = 784 * 1024 + 1024 * 1024 + 1024 * 10
    inner = 1024 * 1024 + 1024 * 10
    assert w2.matmul_flops() == 2 * 256 * (2 * pairs + inner)


def test_the_traffic_model_counts_each_stage_by_hand():
    """w3-b256's step, float32, counted here from the engine's code (docs/performance.md)."""
    w3 = next(w for w in WORKLOADS if w.key == "w3-b256")
    stages = elementwise_bytes(w3)
    rows, hidden, inputs = 256, 3 * 1024, 256 * 784
    weights = 784 * 1024 + 2 * 1024 * 1024
    assert stages["optimizer"] == w3.spec.n_params * 4 * 5  # read p, g, v; write p, v
    assert stages["max_norm"] == weights * 4  # the column norms; few columns are scaled
    assert stages["activations"] == rows * hidden * (8 + 5 + 9 + 9)
    assert stages["input"] == inputs * (1 + 1 + 1 + 4)  # gather the bytes, convert them
    draw = 4 + 4 + 1 + 5 + 8
    assert stages["dropout"] == inputs * (draw + 12) + rows * hidden * (draw + 9 + 6)
    plain = elementwise_bytes(next(w for w in WORKLOADS if w.key == "w3-plain"))
    assert set(stages) - set(plain) == {"dropout", "max_norm"}
    w2 = next(w for w in WORKLOADS if w.key == "w2-b256")
    assert elementwise_bytes(w2)["optimizer"] == 0  # SGD updates inside its products
    assert elementwise_bytes(next(w for w in WORKLOADS if w.layers)) == {}
    assert 1e9 < copy_bandwidth(1 << 20, repeats=3) < 1e13


@pytest.mark.slow
def test_the_stage_profile_times_engine_and_jax_stages(mnist_folder, tmp_path):
    table = stages.profile("w3-b256", 2, 1, lambda line: None, str(mnist_folder), str(tmp_path))
    lines = table.splitlines()
    assert lines[0] == "w3-b256: per step, median of 1 rounds of 2 steps"
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == ["forward", "backward", "optimizer", "step"]
    for line in rows.values():
        engine, jax_time = (float(cell) for cell in re.findall(r"(-?[\d.]+) ms", line))
        assert engine > 0 and math.isfinite(jax_time)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--rounds", "0", "--no-track"], "--rounds 0 is not allowed"),
        (["bench", "--json", "/nonexistent/dir/x.json", "--no-track"], "does not exist"),
    ],
)
def test_bench_user_mistakes_give_one_clear_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
