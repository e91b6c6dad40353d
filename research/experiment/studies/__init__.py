"""Optuna studies: the command's orchestration (:mod:`.study`), the Optuna study object, its
sampler, pruner and search space (:mod:`.optuna_study`), one trial and the budget
(:mod:`.trials`), worker processes (:mod:`.workers`), liveness: stale trials and heartbeats
(:mod:`.liveness`), the storage (:mod:`.storage`) and every use of Optuna internals
(:mod:`.optuna_compat`)."""
