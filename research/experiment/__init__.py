"""Experiments: the field table (:mod:`.fields`), the training loop (:mod:`.train`, which knows
nothing of Optuna or MLflow), tracking (:mod:`.tracking`, the only code that talks to MLflow),
a run's loss curves (:mod:`.figures`), study files (:mod:`.study_config`, with what a study
may search in :mod:`.search_space`), what a run needs from the machine (:mod:`.resources`:
memory, worker processes), Optuna studies (:mod:`.storage`, :mod:`.trials`,
:mod:`.workers`, :mod:`.study`) and reruns (:mod:`.rerun`)."""
