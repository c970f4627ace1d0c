"""Getting data out of a repository: restoring a point's disks to image files and block devices,
into VM disk images (qcow2, raw, any NBD target), and serving a point over NBD for instant
recovery.

May import: ``blockferry.runtime``, ``blockferry.repo``, ``blockferry.datapath`` (extents),
``blockferry.nbd`` and the shared top-level helpers. Never jobs, actors, the daemon or the CLI.
"""
