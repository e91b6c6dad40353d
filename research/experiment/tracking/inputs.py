"""A run's data as MLflow dataset inputs: the UI's Dataset column and each run page's inputs."""

from __future__ import annotations

from typing import Any


def duplicate_key(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a database's unique-key violation."""
    while error is not None:
        text = str(error)
        if "UNIQUE constraint failed" in text or "duplicate key value" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def dataset_inputs(dataset: str, splits: dict[str, tuple[str, int]]) -> list[Any]:
    """MLflow dataset inputs, one per ``context: (rows, number of rows)`` (rows of the official
    sets, as ``train[0:50000]``). Each is named after the dataset, with a digest of its files'
    digests and the rows: the same rows of the same data have the same digest."""
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from research.data import dataset_info

    info = dataset_info(dataset)
    files = "".join(f"{name}:{digest}" for name, digest in sorted(info.digests.items()))
    inputs = []
    for context, (rows, n_rows) in splits.items():
        digest = hashlib.sha256(f"{files}/{rows}".encode()).hexdigest()[:16]
        profile = {"split": rows, "num_rows": n_rows, "inputs": "28x28 uint8 pixels"}
        dataset = Dataset(
            name=info.name,
            digest=digest,
            source_type="http",
            source=json.dumps({"url": info.url}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs
