"""Experiments, in floors (each imports only from the ones before it):

- :mod:`.config`: the field table (:mod:`.config.fields`), its flags and TOML text, study files
  and their search space, paper files, and what a run needs of the machine (memory, workers);
- :mod:`.training`: the training loop (:mod:`.training.train`, which knows nothing of Optuna or
  MLflow), a run's loss curves and the Wilson interval;
- :mod:`.tracking`: the only code that talks to MLflow: stores, the run lifecycle, models,
  reading results back, the UI;
- :mod:`.studies`: Optuna studies: orchestration, trials, worker processes, liveness (stale
  trials, heartbeats), the storage, and Optuna's private contracts fenced in one module;
- :mod:`.reproduction`: ``rerun`` (one logged run again) and ``reproduce`` (a paper's table).
"""
