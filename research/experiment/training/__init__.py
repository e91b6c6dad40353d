"""Training: the loop (:mod:`.train`, an ``on_epoch`` callback, nothing of Optuna or MLflow),
its figures (:mod:`.figures`) and the Wilson interval of a test error (:mod:`.stats`)."""
