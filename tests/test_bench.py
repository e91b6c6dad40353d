"""``python -m research bench --quick``: it runs, prints a well-formed table and logs a well-formed
MLflow run. No timing is asserted (machines are noisy); only that every figure exists and is sane.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from research.bench.contenders import CONTENDERS, WORKLOADS
from research.bench.run import torch_available
from research.cli import main
from research.engine.blas_kernels import VARIABLE, loaded_kernels


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
    assert 0 < results["memory"]["peak_bytes"]
    assert results["memory"]["budget_bytes"] > 0

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
    assert "memory/ratio_to_budget" in metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"bench_table.txt", "bench_results.json"}


def test_contender_names_are_the_documented_ones():
    assert set(CONTENDERS) == {"origin", "engine-f64", "engine-f32", "jax-f32", "torch-f32"}
    assert {w.key for w in WORKLOADS} == {"w1-epoch", "w1-eval", "w2-b256", "w2-b1024"}


def test_matmul_flops_count_forward_weight_gradients_and_inner_deltas():
    w2 = next(w for w in WORKLOADS if w.key == "w2-b256")
    pairs = 784 * 1024 + 1024 * 1024 + 1024 * 10
    inner = 1024 * 1024 + 1024 * 10
    assert w2.matmul_flops() == 2 * 256 * (2 * pairs + inner)


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
