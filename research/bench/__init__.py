"""The side-by-side benchmark, ``python -m research bench``: the workloads and contenders
(:mod:`.contenders`, each in a worker process of its own) and the driver, its table and its
MLflow record (:mod:`.run`)."""
