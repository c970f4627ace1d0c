"""The ``blockferry`` command, one module per command group (``core``: the embedded commands,
the parser and the entry point; ``lifecycle``, ``recovery``, ``archive``, ``daemon``); the only
place that formats output for people. May import every other layer; nothing imports it."""

from blockferry.cli.core import run

__all__ = ["run"]
