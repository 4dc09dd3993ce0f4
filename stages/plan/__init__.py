"""Which tasks exist and what each reads: the stage table, store keys, code fingerprints, the no-op snapshot. No doit."""
