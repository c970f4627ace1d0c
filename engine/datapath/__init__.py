"""The data path of a backup: the source contract that source plugins meet, changed-extent hints
and extents, read plans (which blocks to read, which are holes, which keep the base's chunks),
the per-block processing of a batch (zero check, hash, dedup, compression) and preparing an
incremental's blocks ahead of time.

May import: ``blockferry.runtime``, ``blockferry.repo`` and the shared top-level helpers. Never
jobs, actors, the daemon or the CLI.
"""
