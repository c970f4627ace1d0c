"""The repository: its format (configuration, manifests, packs, indexes), the backend contract
that a storage plugin meets and its optional capabilities, chunks as stored, the store (chunk
index, pack writing, locks, health, commits), and the lifecycle work done on a repository:
retention and prune, garbage collection, verify and repair, copy, the archive tier.

May import: ``blockferry.runtime`` and the shared top-level helpers (``errors``, ``log``,
``units``, ``registry``). Never the data path, restore, jobs, actors, the daemon, the CLI or any
plugin: a repository does not know what filled it.
"""
