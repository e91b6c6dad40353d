"""Training again what was logged or published: ``rerun`` (:mod:`.rerun`, one MLflow run,
compared epoch by epoch) and ``reproduce`` (:mod:`.reproduce`, a paper's table; the table itself,
in Markdown and as data, in :mod:`.paper_table`)."""
