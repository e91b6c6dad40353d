"""Tracking: the only code that talks to MLflow. :mod:`.stores` (where the store is, clients,
locks, errors), :mod:`.runs` (writing runs, and reading one back), :mod:`.results` (reading
studies back for ``analysis/``), :mod:`.ui` (the MLflow UI server) and :mod:`.weights` (the
weights file format)."""
