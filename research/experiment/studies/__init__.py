"""Optuna studies: the command's orchestration (:mod:`.study`), one trial (:mod:`.trials`), worker
processes (:mod:`.workers`), liveness: stale trials and heartbeats (:mod:`.liveness`), the
storage (:mod:`.storage`) and every use of Optuna internals (:mod:`.optuna_compat`)."""
