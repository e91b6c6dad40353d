"""The definition of a run: the field table, its flags and TOML text, study and paper files,
and what a run needs of the machine (memory, worker processes)."""
