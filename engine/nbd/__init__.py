"""The NBD protocol as a library: an async client (what the ``qemu`` source reads disks through)
and a server (what ``blockferry serve`` exports a point with), both on anyio streams.

May import: ``blockferry.errors`` and ``blockferry.log`` only.
"""
