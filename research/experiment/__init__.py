"""Experiments: the field table (:mod:`.fields`), the training loop (:mod:`.train`, which knows
nothing of Optuna or MLflow), tracking (:mod:`.tracking`, the only code that talks to MLflow),
study files (:mod:`.study_config`), Optuna studies (:mod:`.storage`, :mod:`.trials`,
:mod:`.study`) and reruns (:mod:`.rerun`)."""
